"""Turning a failed checkpoint write into a message that says what to do.

A full disk surfaces from ``torch.save`` as ``enforce fail at inline_container.cc:...`` and from
dist-checkpointing as assorted ``OSError``/``RuntimeError``s; neither names the directory, the
free space, or that the previous checkpoint is still the resume point.
"""

from __future__ import annotations

import shutil
from pathlib import Path


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the message names the directory and the way out."""


def save_failure_message(tmp_dir: Path, latest: Path | None, exc: BaseException) -> str:
    """Explain a failed save of ``tmp_dir`` (free space, the intact resume point)."""
    root = tmp_dir.parent
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:,.0f} MiB free"
    except OSError:
        free = "free space unknown"
    resume = (
        f"the last complete checkpoint {latest} is intact and a rerun resumes from it"
        if latest is not None
        else "no earlier checkpoint exists, so a rerun starts from step 0"
    )
    return (
        f"writing checkpoint {tmp_dir} failed ({type(exc).__name__}: {exc}); {root} has {free}. "
        f"If the disk is full, free space or set training.output_dir on a larger filesystem; "
        f"{resume} (the partial {tmp_dir.name} is discarded)"
    )
