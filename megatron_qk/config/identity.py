"""A run's identity: the content hash of a recipe's resolved config, for reusing identical runs.

Several paper tables share arms: the GPT-style seed-1 control (and intervention) of Table 1 is
the same training run as the control of Tables 3 (gpt), 4 (gelu), 6, 7, 9 and 10. Two recipes
whose resolved configs agree in everything that changes the trained model (and in ``arm``,
which ``compare`` groups by) produce the same run, so the table runner trains it once and links
it into every table directory that needs it.

The config's own fields say what is left out of the hash: those declared with
``metadata=NOT_IDENTITY`` (labels and locations, keys that may change on a resume, ``logging``,
checkpoint bookkeeping that does not change the model).

Usage (the table runner)::

    python -m megatron_qk.config.identity CONFIG [KEY=VALUE ...]   # prints the hash
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import config_to_dict, load_config
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.rundir.config_hash import flatten_config, hash_config

ADDED_AFTER_RUNS_EXISTED = (
    "training.init_checkpoint",
    "training.eval_interval_frac",
    "model.qk_layernorm",
    "optim.qk_clip",
)
"""Keys (or whole sections) added once runs had been recorded: hashed only when set away from
their default, so a run (or a table's reuse index) recorded before the key existed keeps its
hash."""


def _field_default(dotted: str) -> object:
    """The schema default of a dotted key (a dict of its leaves for a section)."""
    *sections, name = dotted.split(".")
    cls: type = ExperimentConfig
    for section in sections:  # the section's type: its own defaults may not construct alone
        cls = typing.get_type_hints(cls)[section]
    field = next(f for f in dataclasses.fields(cls) if f.name == name)  # listed keys exist
    if field.default is not dataclasses.MISSING:
        return field.default
    value = field.default_factory()  # type: ignore[misc]
    return flatten_config(dataclasses.asdict(value)) if dataclasses.is_dataclass(value) else value


def unset_added_keys(config_dict: dict) -> frozenset[str]:
    """The dotted leaf keys of :data:`ADDED_AFTER_RUNS_EXISTED` that ``config_dict`` leaves at
    their defaults (a section counts only when every key of it is at its default)."""
    free = identity_excluded_keys()  # e.g. optim.qk_clip.log_only: never part of the identity
    flat = {k: v for k, v in flatten_config(config_dict).items() if k not in free}
    out: set[str] = set()
    for added in ADDED_AFTER_RUNS_EXISTED:
        default = _field_default(added)
        if isinstance(default, dict):
            keys = {k: default.get(k[len(added) + 1 :]) for k in flat if k.startswith(added + ".")}
        else:
            keys = {added: default} if added in flat else {}
        if all(flat[k] == v for k, v in keys.items()):
            out.update(keys)
    return frozenset(out)


def identity_excluded_keys(cls: type = ExperimentConfig, prefix: str = "") -> frozenset[str]:
    """Dotted keys of ``cls`` marked ``NOT_IDENTITY`` (a marked section stands for its keys).

    Args:
        cls: a config dataclass (default: the whole recipe).
        prefix: the dotted path of ``cls`` in the recipe, with a trailing dot.
    """
    hints = typing.get_type_hints(cls)
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if not f.metadata.get("identity", True):
            keys.add(path)
        elif dataclasses.is_dataclass(hints[f.name]):
            keys |= identity_excluded_keys(hints[f.name], path + ".")
    return frozenset(keys)


def config_hash(config_dict: dict) -> str:
    """sha256 (16 hex digits) of the model-relevant part of a resolved config dict."""
    excluded = identity_excluded_keys() | unset_added_keys(config_dict)
    return hash_config(config_dict, excluded, tuple(f"{key}." for key in sorted(excluded)))[:16]


def recipe_hash(config: str, overrides: list[str]) -> str:
    """The hash of a recipe (path or preset) with ``--set`` style overrides applied."""
    return config_hash(config_to_dict(load_config(config, overrides)))


def main(argv: list[str] | None = None) -> int:
    """Print a recipe's hash (``CONFIG [KEY=VALUE ...]``)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(recipe_hash(argv[0], argv[1:]))
    except ConfigError as exc:
        print(f"config_hash: config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
