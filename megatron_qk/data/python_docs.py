"""An English corpus available on every machine without a network: Python's own documentation.

Two sources shipped with every CPython installation (PSF license):

* ``pydoc_data.topics``: the language reference and library topics that ``help()`` shows;
* the docstrings of the standard library's modules, classes and functions, read from the
  ``.py`` sources with :mod:`ast` (nothing is imported or executed).

One JSON-lines record per topic and per module (its docstrings joined by blank lines), in a
fixed order, so the corpus is the same on every run of one Python version.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from megatron_qk.rundir.atomic import atomic_open

# Packages that are tests, demos or vendored code rather than library documentation.
_SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages",
              "dist-packages", "__pycache__", "pydoc_data", "tkinter", "venv"}  # fmt: skip
# Docstrings shorter than this are mostly signatures ("Return x.").
_MIN_DOCSTRING = 80


def _module_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_DOCSTRING:
                texts.append(doc.strip())
    return texts


def python_doc_records(stdlib_dir: str | None = None) -> Iterator[dict]:
    """Yield ``{"id", "text"}`` records: pydoc topics, then one record per stdlib module."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield {"id": f"topic:{name}", "text": text}
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath) / filename
            docs = _module_docstrings(path)
            if docs:
                rel = path.relative_to(root).as_posix()
                yield {"id": f"stdlib:{rel}", "text": "\n\n".join(docs)}


def write_python_docs_corpus(path: Path) -> dict:
    """Write the corpus as JSON lines (atomically) and return ``{documents, characters}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    documents = characters = 0
    with atomic_open(path) as out:
        for record in python_doc_records():
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            documents += 1
            characters += len(record["text"])
    return {"documents": documents, "characters": characters}
