"""Hashing of resolved config dicts and the state of a run directory (stdlib only).

Which keys of a recipe define a run is the config's knowledge
(:mod:`megatron_qk.config.identity`, which also prints a recipe's hash); this module hashes a
plain dict leaving out the keys it is told to.

Usage (the table runner)::

    python -m megatron_qk.rundir.config_hash --state RUN_DIR   # finished|stopped|partial|absent
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from megatron_qk.rundir.layout import METRICS_FILE, SUMMARY_FILE


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
    """Print a run directory's state (``--state RUN_DIR``)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--state":
        print(__doc__, file=sys.stderr)
        return 2
    print(run_state(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
