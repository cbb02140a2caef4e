"""Which steps a run evaluates at (torch-free): ``train --dry-run``, the trainer and the readers
take the grid from here, so the steps listed before a run are the steps it evaluates.

* ``training.eval_interval_frac`` set: the steps ``round(k x frac x planned_steps)``, k = 1, 2,
  ... (halves up, as :func:`~megatron_qk.training.checkpoint_plan.step_at_frac`), the paper's
  grid with 0.005: steps 143, 191, 238 and 262 of 4769 are its Table 8 release points 3.00,
  4.01, 4.99 and 5.49%. A step two k round to is evaluated once.
* otherwise every ``training.eval_interval`` steps (0: no periodic evaluation).

Either way a periodic run also evaluates at step 0, and every run at its last step.
"""

from __future__ import annotations

import math

from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.training.checkpoint_plan import end_step


def evaluates_periodically(cfg: ExperimentConfig) -> bool:
    """Whether the recipe evaluates during training (and at step 0), not only at its end."""
    t = cfg.training
    return t.eval_interval_frac is not None or t.eval_interval > 0


def _grid(cfg: ExperimentConfig) -> set[int]:
    frac, planned = cfg.training.eval_interval_frac, cfg.planned_steps()
    assert frac is not None
    count = math.floor(1.0 / frac + 1e-9)  # k x frac <= 1
    steps = {math.floor(k * frac * planned + 0.5) for k in range(1, count + 1)}
    return {s for s in steps if s >= 1}


def should_evaluate(cfg: ExperimentConfig, step: int) -> bool:
    """Whether the periodic grid evaluates after ``step`` (the last step is always evaluated)."""
    t = cfg.training
    if t.eval_interval_frac is not None:
        return step in _grid(cfg)
    return bool(t.eval_interval) and step % t.eval_interval == 0


def evaluation_steps(cfg: ExperimentConfig) -> list[int]:
    """Every step an uninterrupted run evaluates at (step 0, the grid, the last step)."""
    last = end_step(cfg)
    if not evaluates_periodically(cfg):
        return [last]
    t = cfg.training
    if t.eval_interval_frac is not None:
        grid = _grid(cfg)
    else:
        grid = set(range(t.eval_interval, last + 1, t.eval_interval))
    return sorted({0, last} | {s for s in grid if s <= last})
