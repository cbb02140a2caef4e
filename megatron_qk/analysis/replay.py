"""Replaying the maturity release rule on logged lower-copy scores (``megatron-qk replay-release``).

The replay drives the trainer's own state machine,
:class:`~megatron_qk.optim.release.ReleaseController`, in the trainer's order:

1. ``on_step(0, 0.0)`` (the scheduler's constructor calls ``step(0)``);
2. ``observe`` of the step-0 evaluation, when one was logged;
3. for every step ``s = 1 .. end``: ``on_step(s, s / planned)`` (``scheduler.step`` after each
   optimizer step), then ``observe(s, s / planned, lower_copy, lower_copy_uniform)`` when an
   evaluation (a ``diag`` line) was logged after step ``s``.

Both threshold modes replay: ``absolute`` compares ``lower_copy`` with the threshold,
``over_uniform`` compares ``lower_copy / lower_copy_uniform`` (both logged on every ``diag``
line) with the ratio.

``end`` is the last step the metrics file reaches (capped at the planned steps): for a finished
run every step ``1 .. planned_steps``; for an unfinished one the replay stops where the log does
instead of inventing a forced release the run has not reached yet. With the run's own settings
the replayed release is therefore the one training made (the ``release`` lines), which the
command checks; other settings give the paper's offline replay (Table 8).

This module is the replay itself (pure); reading a run's log and choosing the settings is
:mod:`megatron_qk.analysis.replay_log`, the command :mod:`megatron_qk.cli.replay_release`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from megatron_qk.config.release import PAPER_RELEASE
from megatron_qk.optim.release import ReleaseController, ReleaseEvent

PAPER_DEFAULTS = {
    k: getattr(PAPER_RELEASE, k) for k in ("threshold", "patience", "min_frac", "max_frac")
}
DEFAULT_RULE = "upper_qk"
# The paper's Table 8 variants, each changing one setting of the main rule. They are relative
# so that they stay "nearby" for any main rule; for the paper's rule (0.005 / 3 / 3-12%) they
# are exactly Table 8's rows: threshold 0.003 and 0.007, patience 1 and 5, window 3-8%.
TABLE8_VARIANTS = (
    ("Lower threshold", lambda s: _scaled_threshold(s, 0.6)),
    ("Higher threshold", lambda s: _scaled_threshold(s, 1.4)),
    ("No patience", lambda s: {"patience": 1}),
    ("Stricter patience", lambda s: {"patience": s.patience + 2}),
    ("Shorter forced window", lambda s: {"max_frac": round(s.max_frac * 2 / 3, 12)}),
)


def _scaled_threshold(s: ReleaseSettings, factor: float) -> dict:
    """The compared threshold times ``factor`` (the ratio in ``over_uniform`` mode)."""
    if s.threshold_mode == "over_uniform":
        return {"threshold_ratio": round(s.threshold_ratio * factor, 12)}
    return {"threshold": round(s.threshold * factor, 12)}


class ReplayError(ValueError):
    """The metrics file (or its run's config) cannot be replayed; the message names the file."""


@dataclass(frozen=True)
class ReleaseSettings:
    """The maturity rule's parameters (see :class:`ReleaseController`)."""

    threshold: float = PAPER_DEFAULTS["threshold"]
    patience: int = PAPER_DEFAULTS["patience"]
    min_frac: float = PAPER_DEFAULTS["min_frac"]
    max_frac: float = PAPER_DEFAULTS["max_frac"]
    threshold_mode: str = "absolute"
    threshold_ratio: float | None = None

    @property
    def compared_threshold(self) -> float:
        """What the maturity score is compared with (the threshold or the ratio)."""
        return self.threshold_ratio if self.threshold_mode == "over_uniform" else self.threshold


def _controller(name: str, planned_steps: int, settings: ReleaseSettings) -> ReleaseController:
    # The settings' fields are the constructor's maturity arguments, by name.
    return ReleaseController(
        name=name,
        policy="maturity",
        planned_steps=planned_steps,
        hold_value=1.0,
        **asdict(settings),
    )


def replay_release(
    scores: Sequence[tuple[int, float] | tuple[int, float, float]],
    planned_steps: int,
    settings: ReleaseSettings,
    end_step: int | None = None,
    name: str = DEFAULT_RULE,
) -> ReleaseEvent | None:
    """Replay the maturity rule over steps ``0 .. end_step`` in the trainer's order.

    Args:
        scores: ``(step, lower_copy)`` or ``(step, lower_copy, lower_copy_uniform)`` of the
            evaluations (NaN: no valid position; ``over_uniform`` needs the baseline).
        planned_steps: the run's planned optimizer steps (fractions are ``step / planned``).
        settings: threshold, patience and window.
        end_step: last completed step to replay (default ``planned_steps``).
        name: rule name put in the event.

    Returns:
        The release event, or None when neither maturity nor the forced release happened by
        ``end_step``.
    """
    end = planned_steps if end_step is None else min(int(end_step), planned_steps)
    ctl = _controller(name, planned_steps, settings)
    at_step: dict[int, list[tuple[float, float]]] = {}
    for step, copy, *uniform in scores:
        base = float(uniform[0]) if uniform else math.nan
        at_step.setdefault(int(step), []).append((float(copy), base))
    for step in range(0, end + 1):
        frac = step / planned_steps
        event = ctl.on_step(step, frac)
        if event is not None:
            return event
        for copy, base in at_step.get(step, ()):
            event = ctl.observe(step, frac, copy, base)
            if event is not None:
                return event
    return None


def first_crossing(
    scores: Sequence[tuple[int, float] | tuple[int, float, float]],
    threshold: float | ReleaseSettings,
) -> tuple[int, float] | None:
    """First ``(step, maturity score)`` at or above the threshold (the paper's maturity *event*).

    Args:
        scores: as for :func:`replay_release`.
        threshold: an absolute lower-copy threshold, or the settings (whose mode decides the
            score: ``over_uniform`` divides by the logged uniform baseline).
    """
    if not isinstance(threshold, ReleaseSettings):
        threshold = ReleaseSettings(threshold=float(threshold))
    ctl = _controller(DEFAULT_RULE, 1, threshold)
    for step, copy, *uniform in scores:
        score = ctl.maturity_score(copy, uniform[0] if uniform else math.nan)
        if not math.isnan(score) and score >= ctl.compared_threshold:
            return int(step), float(score)
    return None
