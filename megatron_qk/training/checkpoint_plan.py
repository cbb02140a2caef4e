"""Which steps a run checkpoints at, where it stops, and which checkpoints rotation may remove.

Torch-free: ``train --dry-run``, the trainer and the table runner all read the plan from here,
so the steps printed before a run are the steps it saves.

* Interval checkpoints: every ``training.save_interval`` steps (rotated by
  ``training.keep_interval_checkpoints``).
* Fraction checkpoints: ``training.save_at_fracs`` of the *planned* steps, each rounded to the
  nearest step (halves up, at least step 1). The paper reads its mechanism at 3% and 20% of
  training, which no interval of 240 steps hits; these are written once and never rotated.
* The end checkpoint: the planned last step, or the ``training.stop_at_frac`` step of a run
  stopped on purpose (Table 5 trains the full schedule to 20% only).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.rundir.layout import checkpoint_step, list_checkpoints


def step_at_frac(frac: float, planned_steps: int) -> int:
    """The optimizer step nearest to ``frac`` of ``planned_steps`` (halves up, in [1, planned])."""
    return max(1, min(planned_steps, math.floor(frac * planned_steps + 0.5)))


def end_step(cfg: ExperimentConfig) -> int:
    """The last step this recipe trains to: the planned end or ``training.stop_at_frac``."""
    planned = cfg.planned_steps()
    frac = cfg.training.stop_at_frac
    return planned if frac is None else step_at_frac(frac, planned)


def frac_checkpoint_steps(cfg: ExperimentConfig) -> list[int]:
    """Steps of the ``training.save_at_fracs`` checkpoints that fall inside the run, sorted."""
    planned, last = cfg.planned_steps(), end_step(cfg)
    steps = {step_at_frac(f, planned) for f in cfg.training.save_at_fracs}
    return sorted(s for s in steps if s <= last)


def planned_checkpoint_steps(cfg: ExperimentConfig) -> list[int]:
    """Every step an uninterrupted run saves at: interval, fraction and end checkpoints."""
    last, interval = end_step(cfg), cfg.training.save_interval
    steps = set(frac_checkpoint_steps(cfg)) | {last}
    if interval:
        steps |= set(range(interval, last, interval))
    return sorted(steps)


def is_save_step(cfg: ExperimentConfig, step: int) -> bool:
    """Whether ``step`` is an interval or fraction checkpoint (the end one is saved separately)."""
    interval = cfg.training.save_interval
    return bool(interval and step % interval == 0) or step in frac_checkpoint_steps(cfg)


def removable_checkpoints(cfg: ExperimentConfig, saved_steps: list[int]) -> list[int]:
    """Steps of saved checkpoints that ``training.keep_interval_checkpoints`` lets go.

    Fraction checkpoints and the end checkpoint are always kept; of the others (interval and
    ``exit_after_steps`` checkpoints), the newest ``keep_interval_checkpoints`` are kept, so the
    newest checkpoint (the resume point) always survives.
    """
    keep = cfg.training.keep_interval_checkpoints
    if not keep:
        return []
    protected = set(frac_checkpoint_steps(cfg)) | {end_step(cfg)}
    rotating = sorted(s for s in saved_steps if s not in protected)
    return rotating[: max(0, len(rotating) - keep)]


def rotate_checkpoints(cfg: ExperimentConfig, ckpt_root: Path) -> list[Path]:
    """Delete the checkpoints :func:`removable_checkpoints` names (rank 0, after a save).

    Returns:
        The removed directories.
    """
    saved = {checkpoint_step(path.name): path for path in list_checkpoints(ckpt_root)}
    removed = []
    for step in removable_checkpoints(cfg, sorted(saved)):
        shutil.rmtree(saved[step])
        removed.append(saved[step])
    return removed
