"""Where things live in a run directory, and how checkpoints are named (torch-free).

The one home of the run directory's file names (``docs/RUN_DIRECTORY.md`` describes their
content): writers and readers take the names from here instead of spelling them out. Checkpoint
directories are ``checkpoints/iter_XXXXXXX`` (the step, seven digits or more); one is complete
when its ``train_state.pt`` exists and it is not ``.tmp`` debris of an interrupted save, and
``checkpoints/latest`` names the newest complete one.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
IDENTITY_FILE = "run_identity.json"
LOCK_FILE = "run.lock"
DIAGNOSE_FILE = "diagnose.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.pt"
RNG_FILE_GLOB = "rng_rank*.pt"
# Downstream reports of ``megatron-qk eval``: eval.json (newest checkpoint of the run) or
# eval_iter_XXXXXXX.json (one named checkpoint).
EVAL_FILE = "eval.json"
EVAL_GLOB = "eval*.json"

_CHECKPOINT_NAME = re.compile(r"iter_(\d{7,})")


def checkpoints_dir(run_dir: Path) -> Path:
    """The run's ``checkpoints/`` directory."""
    return Path(run_dir) / CHECKPOINTS_DIR


def rng_file_name(rank: int) -> str:
    """File name of one rank's RNG states inside a checkpoint."""
    return f"rng_rank{rank}.pt"


def eval_file_name(checkpoint: Path) -> str:
    """Report name of an evaluation of one named checkpoint: ``eval_iter_XXXXXXX.json``."""
    return f"eval_{Path(checkpoint).name}.json"


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"iter_{step:07d}"


def checkpoint_step(name: str) -> int | None:
    """The step a checkpoint directory name stands for (None when it is no checkpoint name)."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint directory (it holds ``train_state.pt``)."""
    return (Path(path) / TRAIN_STATE_FILE).exists()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Every complete checkpoint under ``ckpt_root``, oldest first (``.tmp`` debris skipped)."""
    return sorted(
        p
        for p in Path(ckpt_root).glob("iter_*")
        if p.is_dir() and not p.name.endswith(".tmp") and is_checkpoint(p)
    )


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_root`` (None when there is none).

    Raises:
        RuntimeError: the ``latest`` marker names no checkpoint, or a missing one.
    """
    marker = Path(ckpt_root) / LATEST_FILE
    if not marker.exists():
        return None
    name = marker.read_text(encoding="utf-8").strip()
    if checkpoint_step(name) is None:
        # The marker is data from a possibly shared run directory: never a path to follow.
        raise RuntimeError(f"{marker} names {name!r}, which is not a checkpoint (iter_XXXXXXX)")
    path = Path(ckpt_root) / name
    if not is_checkpoint(path):
        raise RuntimeError(f"{marker} names {name}, but {path}/{TRAIN_STATE_FILE} is missing")
    return path


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """Find the checkpoint directory and its run directory.

    Args:
        path: a run directory (its newest checkpoint is used), its ``checkpoints/`` directory,
            or one ``iter_XXXXXXX`` checkpoint directory.

    Returns:
        ``(checkpoint_dir, run_dir)``.

    Raises:
        FileNotFoundError: naming what is missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_checkpoint(path):
        ckpt = path
    else:
        root = checkpoints_dir(path) if checkpoints_dir(path).is_dir() else path
        ckpt = latest_checkpoint(root)
        if ckpt is None:
            raise FileNotFoundError(
                f"{path} is neither a checkpoint (no {TRAIN_STATE_FILE}) nor a run directory "
                f"with a complete checkpoint ({root}/{LATEST_FILE} is missing)"
            )
    run_dir = ckpt.parent.parent
    if not (run_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(
            f"{run_dir / CONFIG_FILE} is missing: a checkpoint is read with the recipe of its "
            "run directory (<run>/checkpoints/iter_XXXXXXX)"
        )
    return ckpt, run_dir
