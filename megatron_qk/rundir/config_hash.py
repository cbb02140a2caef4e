"""Content hash of a recipe's resolved config, for reusing identical runs across tables.

Several paper tables share arms: the GPT-style seed-1 control (and intervention) of Table 1 is
the same training run as the control of Tables 3 (gpt), 4 (gelu), 6, 7, 9 and 10. Two recipes
whose resolved configs agree in everything that changes the trained model (and in ``arm``,
which ``compare`` groups by) produce the same run, so the table runner trains it once and links
it into every table directory that needs it.

Excluded from the hash: labels and locations (``name``, ``training.output_dir``), the keys that
may change on a resume (``training.resume``, ``training.exit_after_steps``,
``training.log_interval``), ``logging.*`` and checkpoint bookkeeping that does not change the
model (``training.save_interval``, ``training.save_at_fracs``,
``training.keep_interval_checkpoints``).

Usage (the table runner)::

    python -m megatron_qk.rundir.config_hash CONFIG [KEY=VALUE ...]   # prints the hash
    python -m megatron_qk.rundir.config_hash --state RUN_DIR           # finished|stopped|...
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from megatron_qk.rundir.layout import METRICS_FILE, SUMMARY_FILE

EXCLUDED_KEYS = frozenset(
    {
        "name",
        "training.output_dir",
        "training.resume",
        "training.exit_after_steps",
        "training.log_interval",
        "training.save_interval",
        "training.save_at_fracs",
        "training.keep_interval_checkpoints",
    }
)
EXCLUDED_PREFIXES = ("logging.",)


def flatten_config(data: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}`` (the spelling of ``--set`` keys)."""
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, path + "."))
        else:
            out[path] = value
    return out


def hash_config(
    config_dict: dict,
    excluded: set[str] | frozenset[str] = frozenset(),
    excluded_prefixes: tuple[str, ...] = (),
) -> str:
    """sha256 (hex) of a resolved config dict's canonical JSON, leaving out the ``excluded``
    dotted keys, keys under ``excluded_prefixes`` and the ``_meta`` block (versions, git sha)."""
    flat = {
        k: v
        for k, v in flatten_config(config_dict).items()
        if k not in excluded
        and not k.startswith(excluded_prefixes)
        and k != "_meta"
        and not k.startswith("_meta.")
    }
    text = json.dumps(flat, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_hash(config_dict: dict) -> str:
    """sha256 (16 hex digits) of the model-relevant part of a resolved config dict."""
    return hash_config(config_dict, EXCLUDED_KEYS, EXCLUDED_PREFIXES)[:16]


def recipe_hash(config: str, overrides: list[str]) -> str:
    """The hash of a recipe (path or preset) with ``--set`` style overrides applied."""
    from megatron_qk.config.loader import config_to_dict, load_config

    return config_hash(config_to_dict(load_config(config, overrides)))


def run_state(run_dir: Path) -> str:
    """``finished``, ``stopped`` (on purpose, by ``training.stop_at_frac``), ``partial`` or
    ``absent``, from the run directory's summary.json and metrics.jsonl."""
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        data = json.loads(summary.read_text(encoding="utf-8"))
        if data.get("finished"):
            return "finished"
        if data.get("stopped"):
            return "stopped"
    return "partial" if (run_dir / METRICS_FILE).exists() else "absent"


def main(argv: list[str] | None = None) -> int:
    """Print a recipe's hash, or (``--state RUN_DIR``) a run directory's state."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "--state":
        print(run_state(Path(argv[1])))
        return 0
    from megatron_qk.config.schema import ConfigError

    try:
        print(recipe_hash(argv[0], argv[1:]))
    except ConfigError as exc:
        print(f"config_hash: config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
