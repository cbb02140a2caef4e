"""Paired-seed comparison of finished runs (the paper's Table 1).

Runs are grouped by ``arm`` and paired by ``training.seed``; every arm other than the control is
compared with the control run of the same seed:

* final validation loss and perplexity per arm: mean +- *sample* standard deviation over seeds
  ("n/a" with a single seed);
* paired differences (arm minus control), mean +- sample sd over seeds;
* tokens to reach the control's final loss. The target of a run is the final validation loss of
  *its paired control run* (same seed), not the mean over control seeds, so each difference is a
  within-pair quantity like the loss differences. The tokens are read off the run's own eval
  curve: the first evaluation whose ``val_loss <= target`` and, when an earlier evaluation lies
  above it, linear interpolation of tokens vs val_loss between the two; a run whose curve never
  reaches the target is reported as not reached. The control itself needs, by definition, its
  whole budget (the tokens of its final evaluation), as in Table 1;
* token saving = control tokens - tokens to target, in tokens and in % of the control's tokens.

The computations are pure functions (:func:`mean_sd`, :func:`tokens_to_target`,
:func:`paired_differences`, :func:`token_saving`, :func:`compare_runs`); finding, reading and
validating the runs is :mod:`megatron_qk.analysis.compare_load`, the table
:mod:`megatron_qk.analysis.compare_format` and the command :mod:`megatron_qk.cli.compare`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_CONTROL = "control"


class CompareError(ValueError):
    """The given run directories cannot be compared (the message names the run directory)."""


@dataclass
class Run:
    """One finished run as the comparison needs it.

    Attributes:
        path: the run directory.
        arm: ``arm`` of its config.
        seed: ``training.seed`` of its config.
        final_val_loss: from summary.json.
        final_val_ppl: from summary.json.
        tokens: training tokens of the run (summary.json).
        curve: ``(tokens, val_loss)`` of every evaluation, in training order.
        config: the flattened resolved config (dotted keys).
    """

    path: str
    arm: str
    seed: int
    final_val_loss: float
    final_val_ppl: float
    tokens: int
    curve: list[tuple[float, float]] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    # summary.json's fingerprint of the training order and validation set (None: older run).
    data_order: str | None = None


# ------------------------------------------------------------------------------------------
# Pure computations
# ------------------------------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for fewer than two values).

    Raises:
        ValueError: for an empty sequence.
    """
    if not values:
        raise ValueError("mean_sd of no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def tokens_to_target(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """Tokens at which an eval curve first reaches ``val_loss <= target``.

    Points with a non-finite loss are skipped. If the first (finite) point already reaches the
    target its tokens are returned; otherwise tokens are interpolated linearly in
    ``(tokens, val_loss)`` between the last point above the target and the first at or below it.

    Args:
        curve: ``(tokens, val_loss)`` pairs in training order.
        target: the loss to reach.

    Returns:
        The interpolated token count, or None when the curve never reaches the target.
    """
    points = [(float(t), float(v)) for t, v in curve if math.isfinite(v)]
    for i, (tokens, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return tokens
            t0, l0 = points[i - 1]
            # l0 > target >= loss, so l0 - loss > 0.
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
    return None


def paired_differences(control: dict[int, float], other: dict[int, float]) -> dict[int, float]:
    """``other[seed] - control[seed]`` for every seed (both must have the same seeds).

    Raises:
        ValueError: when the seed sets differ.
    """
    if set(control) != set(other):
        raise ValueError(f"seed sets differ: {sorted(control)} vs {sorted(other)}")
    return {seed: other[seed] - control[seed] for seed in sorted(control)}


def token_saving(control_tokens: float, tokens: float | None) -> tuple[float, float] | None:
    """Saving of a run that reached the target after ``tokens``: (tokens saved, % of control).

    Returns:
        ``(control_tokens - tokens, 100 * saved / control_tokens)``, or None when not reached.
    """
    if tokens is None:
        return None
    saved = control_tokens - tokens
    return saved, 100.0 * saved / control_tokens


def _stats(values: Sequence[float]) -> dict:
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": sd, "n": len(values)}


def compare_runs(runs: Sequence[Run], control_arm: str = DEFAULT_CONTROL) -> dict:
    """The comparison of already validated runs (see :func:`validate_runs`) as plain data.

    Returns:
        ``{"control_arm", "target", "seeds", "arms": {arm: {...}}, "differences": {arm: {...}},
        "pairs": [...]}``; token quantities of arms where some seed never reached the target
        have ``None`` statistics.
    """
    by_arm: dict[str, dict[int, Run]] = {}
    for run in runs:
        by_arm.setdefault(run.arm, {})[run.seed] = run
    control = by_arm[control_arm]
    seeds = sorted(control)
    arms_out: dict[str, dict] = {}
    diffs_out: dict[str, dict] = {}
    pairs: list[dict] = []
    ctl_tokens = {s: float(control[s].tokens) for s in seeds}
    ordered = [control_arm] + sorted(a for a in by_arm if a != control_arm)
    for arm in ordered:
        group = by_arm[arm]
        loss = {s: group[s].final_val_loss for s in seeds}
        ppl = {s: group[s].final_val_ppl for s in seeds}
        entry = {
            "runs": [group[s].path for s in seeds],
            "final_val_loss": _stats(list(loss.values())),
            "final_val_ppl": _stats(list(ppl.values())),
        }
        if arm == control_arm:
            entry["tokens_to_target"] = _stats(list(ctl_tokens.values()))
            entry["token_saving"] = None
            arms_out[arm] = entry
            continue
        reached = {s: tokens_to_target(group[s].curve, control[s].final_val_loss) for s in seeds}
        savings = {s: token_saving(ctl_tokens[s], reached[s]) for s in seeds}
        all_reached = all(v is not None for v in reached.values())
        entry["reached"] = sum(v is not None for v in reached.values())
        entry["tokens_to_target"] = _stats(list(reached.values())) if all_reached else None
        entry["token_saving"] = None
        if all_reached:
            entry["token_saving"] = {
                unit: _stats([savings[s][i] for s in seeds])
                for i, unit in enumerate(("tokens", "percent"))
            }
        arms_out[arm] = entry
        d_loss = paired_differences({s: control[s].final_val_loss for s in seeds}, loss)
        d_ppl = paired_differences({s: control[s].final_val_ppl for s in seeds}, ppl)
        diffs_out[arm] = {
            "final_val_loss": _stats(list(d_loss.values())),
            "final_val_ppl": _stats(list(d_ppl.values())),
            "tokens_to_target": (
                _stats([reached[s] - ctl_tokens[s] for s in seeds]) if all_reached else None
            ),
        }
        for s in seeds:
            saved, pct = savings[s] or (None, None)
            pairs.append(
                dict(seed=s, arm=arm, run=group[s].path, control_run=control[s].path)
                | dict(target_val_loss=control[s].final_val_loss, control_tokens=ctl_tokens[s])
                | dict(final_val_loss_diff=d_loss[s], final_val_ppl_diff=d_ppl[s])
                | dict(tokens_to_target=reached[s], saving_tokens=saved, saving_percent=pct)
            )
    return {
        "control_arm": control_arm,
        "target": "final val_loss of the paired control run (same seed)",
        "seeds": seeds,
        "arms": arms_out,
        "differences": diffs_out,
        "pairs": pairs,
    }
