"""Local lm-eval task folders are data unless the user says they trust their code.

lm-evaluation-harness runs Python from a task folder in two ways: a YAML value tagged
``!function mod.fn`` imports ``mod.py`` next to the YAML (or any importable module, so
``!function os.system`` needs no file at all), and Python files shipped beside the YAMLs are what
those tags import. A task folder received from someone else is therefore refused when any YAML in
it (or any YAML it ``include:``s) carries a non-standard tag, or when it holds Python files, unless
``--trust-task-code`` is given. The check composes YAML node trees with PyYAML's safe loader, which
builds no objects, so reading a hostile YAML here runs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

# Python sources and compiled modules: anything importlib could load from the folder.
CODE_SUFFIXES = (".py", ".pyc", ".pyw", ".so", ".pyd")
YAML_SUFFIXES = (".yaml", ".yml")
# Standard YAML tags (resolved implicitly by the safe loader); anything else is an application tag.
_STANDARD_TAG_PREFIX = "tag:yaml.org,2002:"


class UntrustedTaskCodeError(ValueError):
    """A task folder would run code and ``--trust-task-code`` was not given."""


def _nodes(node: yaml.Node):
    stack = [node]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.extend((key, value))


def _code_tags(path: Path) -> tuple[list[str], list[str]]:
    """``(code tags, include targets)`` of one YAML file, read without constructing anything."""
    try:
        with open(path, "rb") as f:
            root = yaml.compose(f, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise UntrustedTaskCodeError(f"{path} is not valid YAML: {e}") from e
    if root is None:
        return [], []
    tags, includes = [], []
    for node in _nodes(root):
        tag = node.tag or ""
        if not tag.startswith(_STANDARD_TAG_PREFIX) or "python" in tag:
            value = node.value if isinstance(node, yaml.ScalarNode) else "..."
            tags.append(f"{tag} {value}")
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "include":
                items = value.value if isinstance(value, yaml.SequenceNode) else [value]
                includes += [v.value for v in items if isinstance(v, yaml.ScalarNode)]
    return tags, includes


def _harness_tasks_dir() -> Path | None:
    try:
        import lm_eval.tasks
    except ImportError:
        return None
    return Path(lm_eval.tasks.__file__).resolve().parent


def find_task_code(task_dirs: list[Path]) -> list[str]:
    """Everything in ``task_dirs`` that would make the harness run code, one line each."""
    problems: list[str] = []
    builtin = _harness_tasks_dir()
    pending: list[Path] = []
    for task_dir in task_dirs:
        for root, dirs, files in os.walk(task_dir):  # symlinked directories are not followed
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in sorted(files):
                path = Path(root) / name
                if name.endswith(CODE_SUFFIXES):
                    problems.append(f"{path}: Python code in the task folder")
                elif name.endswith(YAML_SUFFIXES):
                    pending.append(path)
    checked: set[Path] = set()
    while pending:
        path = pending.pop()
        resolved = path.resolve()
        if resolved in checked:
            continue
        checked.add(resolved)
        if builtin is not None and resolved.is_relative_to(builtin):
            continue  # the harness's own task YAMLs come with the installed (trusted) package
        if not resolved.is_file():
            continue  # a missing include is the harness's error to report
        tags, includes = _code_tags(resolved)
        problems += [f"{path}: tag {t!r} runs code" for t in tags]
        pending += [resolved.parent / inc for inc in includes]
    return problems


def check_task_dirs(task_dirs: list[Path], trust_task_code: bool) -> None:
    """Refuse task folders that would run code, unless the user trusts them.

    Raises:
        UntrustedTaskCodeError: listing the files and tags found.
    """
    if trust_task_code or not task_dirs:
        return
    problems = find_task_code(task_dirs)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UntrustedTaskCodeError(
            "refusing --task-dir: these task files would run Python code when the tasks load:\n  "
            f"{shown}{more}\nPass --trust-task-code only if you trust whoever wrote them."
        )
