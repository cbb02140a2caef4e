"""Strict YAML loading of :class:`ExperimentConfig` with presets and dotted overrides.

A recipe is a YAML mapping whose keys mirror the dataclasses of ``schema.py`` and its sections.
It may start from a preset or another recipe with ``base: tiny`` (a preset name) or
``base: ../other.yaml`` (a path relative to the recipe); the recipe's keys are deep-merged over
the base. ``--set a.b=c`` overrides are applied last; their values are parsed as YAML scalars
(``--set optim.lr=1e-3``).

Every error names the dotted path of the offending key and where it came from (the file and line,
or the ``--set``); an unknown key comes with the keys it may have meant (``config/suggest.py``). A
loaded config remembers those sources, so problems found later (the training preflight) are
located too (:func:`locate`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.config.suggest import suggest

PRESET_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    """Names of the packaged presets (``megatron_qk/config/presets/*.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_summaries() -> list[tuple[str, str]]:
    """``(name, one line)`` per preset: its header comment's first phrase and the model's shape.

    For ``megatron-qk train --help``; reads the preset files only (no torch).
    """
    out = []
    for name in list_presets():
        text = (PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8")
        header = " ".join(
            line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")
        )
        phrase = re.split(r"[.:;](?:\s|$)", header, maxsplit=1)[0]
        phrase = re.sub(r"\s*\([^)]*\)", "", phrase).strip()  # "(Section 4, Appendix J)"
        m = load_config(name).model
        shape = f"{m.num_layers} layers x {m.hidden_size}, {m.ffn} {m.ffn_hidden_size}"
        out.append((name, f"{phrase} ({shape}, seq {m.seq_length})"))
    return out


def _resolve_source(source: str | Path, relative_to: Path | None = None) -> Path:
    text = str(source)
    candidate = Path(text)
    if relative_to is not None and not candidate.is_absolute():
        candidate = relative_to / candidate
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.exists():
            raise ConfigError("", f"recipe file not found: {candidate}")
        return candidate
    preset = PRESET_DIR / f"{text}.yaml"
    if preset.exists():
        return preset
    raise ConfigError("", f"unknown preset or missing file {text!r}; presets: {list_presets()}")


def _line_map(node: yaml.Node, prefix: str = "", out: dict | None = None) -> dict[str, int]:
    """Map dotted paths to 1-based line numbers from a composed YAML node tree."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[path] = key_node.start_mark.line + 1
            _line_map(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = item.start_mark.line + 1
            _line_map(item, path, out)
    return out


def _read_yaml(path: Path) -> tuple[dict, dict[str, tuple[Path, int]]]:
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    lines = {k: (path, v) for k, v in _line_map(node).items()} if node is not None else {}
    return data, lines


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    if path.resolve() in seen:
        raise ConfigError("base", f"circular base chain: {' -> '.join(map(str, seen + (path,)))}")
    data, lines = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data, lines
    if not isinstance(base, str):
        raise ConfigError("base", f"{path}: base must be a preset name or a path")
    base_data, base_lines = _load_with_bases(
        _resolve_source(base, path.parent), seen + (path.resolve(),)
    )
    return _deep_merge(base_data, data), {**base_lines, **lines}


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError("", f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError("", f"override {text!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse override value {raw!r}: {exc}") from exc
    return parts, value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    """Set ``data[parts[0]]...[parts[-1]] = value``, creating intermediate mappings."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a section; cannot set a sub-key")
        node = child
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


# PyYAML follows YAML 1.1, where "1e-2" or "3e9" (no dot) are strings; YAML 1.2 and every user
# read them as numbers, so number fields accept that spelling.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# PyYAML reads yes/no/on/off/true/false (any case, unquoted) as booleans.
_BOOLEAN_HINT = (
    "; YAML reads an unquoted yes/no/on/off/true/false as a boolean: quote the value if you "
    "meant the word"
)


def _build(tp: Any, value: Any, path: str) -> Any:
    """Convert a YAML value to ``tp`` strictly, raising ConfigError with ``path``."""
    try:
        return _build_value(tp, value, path)
    except ConfigError as exc:
        if isinstance(value, bool) and exc.path == path and _BOOLEAN_HINT not in exc.message:
            raise ConfigError(path, exc.message + _BOOLEAN_HINT) from None
        raise


def _build_value(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp in (int, float) and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        value = float(value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) < len(get_args(tp)):
                return None
            raise ConfigError(path, "must not be null")
        return _build(args[0], value, path)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(path, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp)
        return [_build(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                return int(value)  # 2.5e9 tokens written in scientific notation
            raise ConfigError(path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise AssertionError(f"unsupported schema type {tp!r} at {path}")


def build_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = suggest(path, list(fields), str(key))
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(
                key_path,
                f"unknown key{hint} (known keys of {path or 'the recipe'}: {sorted(fields)})",
            )
        kwargs[key] = _build(hints[key], value, key_path)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        full = f"{path}.{exc.path}" if path and exc.path else (exc.path or path)
        raise ConfigError(full, exc.message) from None


def _is_under(key: str, path: str) -> bool:
    return key.startswith((f"{path}.", f"{path}["))


def _where(path: str, lines: dict[str, tuple[str, int]]) -> str | None:
    """``file:line`` (or ``--set KEY=VALUE``) that gave ``path``, its section or, for a key that
    only its sub-keys were given for (``--set foo.bar=1`` for an unknown ``foo``), its sub-key."""
    below = next((k for k in lines if _is_under(k, path)), None) if path else None
    while path:
        if path in lines:
            break
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
        path = "" if parent == path else parent
    key = path or below
    if key is None:
        return None
    file, line = lines[key]
    return f"{file}:{line}" if line else str(file)


def _locate(exc: ConfigError, lines: dict[str, tuple[str, int]]) -> ConfigError:
    where = _where(exc.path, lines)
    if where is None:
        return exc
    located = type(exc).__new__(type(exc))  # keeps the subclass and its other attributes
    located.__dict__.update(exc.__dict__)
    located.message = f"{exc.message} ({where})"
    located.args = (f"{exc.path}: {located.message}" if exc.path else located.message,)
    return located


# Attribute of a loaded config holding where each key came from (not a dataclass field: it is
# not part of the recipe, its identity or config.yaml).
_SOURCES = "_recipe_sources"


def locate(exc: ConfigError, cfg: ExperimentConfig) -> ConfigError:
    """``exc`` with the file:line (or ``--set``) of its key appended, when ``cfg`` came from
    :func:`load_config`; for problems found after loading (the training preflight)."""
    lines = getattr(cfg, _SOURCES, None)
    return _locate(exc, lines) if lines else exc


def load_config(
    source: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load a recipe file or preset name, apply ``--set`` overrides, and validate it.

    Args:
        source: a YAML path or a preset name (see :func:`list_presets`).
        overrides: ``key.path=value`` strings applied after the file (and its bases).

    Returns:
        The validated :class:`ExperimentConfig`.

    Raises:
        ConfigError: naming the dotted path (and file:line when known) of the offending key.
    """
    data, raw_lines = _load_with_bases(_resolve_source(source))
    lines = {k: (str(file), line) for k, (file, line) in raw_lines.items()}
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, parts, value)
        key = ".".join(parts)
        # The value replaces whatever the files said below this key.
        lines = {k: v for k, v in lines.items() if not _is_under(k, key)}
        lines[key] = (f"--set {text}", 0)  # the value comes from the CLI
    try:
        cfg = build_dataclass(ExperimentConfig, data)
    except ConfigError as exc:
        raise _locate(exc, lines) from None
    setattr(cfg, _SOURCES, lines)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict form of a config (for config.yaml in the run directory)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: ExperimentConfig, extra: dict | None = None) -> str:
    """YAML text of a resolved config, with optional extra top-level keys (versions, git sha).

    Extra keys go under ``_meta`` so the file still loads with :func:`load_config` after removing
    that block.
    """
    data = config_to_dict(cfg)
    if extra:
        data = {"_meta": extra, **data}
    return yaml.safe_dump(data, sort_keys=False)


def load_resolved_config(path: str | Path) -> ExperimentConfig:
    """Load a run directory's ``config.yaml`` (ignores the ``_meta`` block)."""
    data, _ = _read_yaml(Path(path))
    data.pop("_meta", None)
    return build_dataclass(ExperimentConfig, data)
