"""What ``megatron-qk train`` says besides its options: the preset list of its ``--help`` and the
hint after an error about missing data files. Torch-free (``--help`` imports nothing heavy)."""

from __future__ import annotations

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import preset_summaries

DATA_KEYS = ("data.train_prefixes", "data.valid_prefixes")


def presets_epilog() -> str:
    """The ``--help`` epilog: one line per packaged preset."""
    summaries = preset_summaries()
    width = max(len(name) for name, _ in summaries)
    lines = [f"  {name:<{width}}  {line}" for name, line in summaries]
    return "presets (CONFIG may name one, or a recipe may start from one with base: NAME):\n" + (
        "\n".join(lines)
    )


def data_hint(exc: ConfigError, dry_run: bool) -> str | None:
    """What to do when ``exc`` (a config or preflight error) says data files do not exist.

    Returns:
        One line naming ``megatron-qk preprocess`` and ``--no-data-check``, or None when no
        problem of ``exc`` is a missing data file.
    """
    problems = getattr(exc, "problems", None) or [exc]
    if not any(p.path.startswith(DATA_KEYS) and "does not exist" in p.message for p in problems):
        return None
    make = (
        "make the data files with `megatron-qk preprocess` (or point data.train_prefixes / "
        "data.valid_prefixes at yours with --set)"
    )
    if dry_run:
        return f"{make}, or add --no-data-check to check the rest of the recipe before they exist"
    return f"{make}; `--dry-run --no-data-check` checks the rest of the recipe before they exist"
