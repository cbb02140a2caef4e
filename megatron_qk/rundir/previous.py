"""Detecting an existing run in a directory and moving it aside intact (``--overwrite``).

A run directory is never emptied or mixed: starting over either refuses, or moves every entry of
the old run into ``RUN_DIR.prev-<UTC timestamp>`` and starts in the emptied directory.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from megatron_qk.rundir.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
)

# Entries that mean "a run happened here" (a bare lock file or an empty directory do not).
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINTS_DIR)


class ExistingRunError(RuntimeError):
    """A fresh start was asked for in a directory that holds another run."""


def holds_run(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds (part of) a run: a config, metrics, summary or checkpoints."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in RUN_MARKERS)


def previous_run_path(run_dir: Path, now: datetime.datetime | None = None) -> Path:
    """A free ``RUN_DIR.prev-<YYYYmmddTHHMMSSZ>`` name next to ``run_dir``."""
    now = now or datetime.datetime.now(datetime.UTC)
    base = f"{run_dir.name}.prev-{now.strftime('%Y%m%dT%H%M%SZ')}"
    candidate, n = run_dir.with_name(base), 1
    while candidate.exists():
        candidate, n = run_dir.with_name(f"{base}.{n}"), n + 1
    return candidate


def move_run_aside(run_dir: str | os.PathLike[str]) -> Path:
    """Move every entry of ``run_dir`` except the lock file into a new ``.prev-`` directory.

    The lock file stays so the caller keeps holding the lock on the directory it trains in.
    Entries are moved with ``os.rename`` (same filesystem, atomic per entry, nothing copied).

    Returns:
        The directory now holding the old run.
    """
    run_dir = Path(run_dir)
    target = previous_run_path(run_dir)
    target.mkdir(mode=0o700)
    for entry in sorted(run_dir.iterdir()):
        if entry.name != LOCK_FILE:
            os.rename(entry, target / entry.name)
    return target


def check_fresh_start(run_dir: str | os.PathLike[str], resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over an old one unless ``overwrite`` (checked, not acted on).

    Raises:
        ExistingRunError: when ``resume`` is false, ``run_dir`` holds a run and not ``overwrite``.
    """
    if resume or overwrite or not holds_run(run_dir):
        return
    raise ExistingRunError(
        f"{run_dir} holds an earlier run and training.resume is false: nothing was changed. Give "
        "another training.output_dir, resume it (training.resume=true), or pass --overwrite to "
        f"move the old run to {Path(run_dir).name}.prev-<timestamp> and start over"
    )
