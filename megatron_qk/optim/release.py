"""Release rules for learning-rate multipliers: a pure, deterministic state machine per rule.

A :class:`ReleaseController` decides *when* a rule lets go of its multiplier and gives the
factor to apply at every optimizer step:

* ``maturity`` (the paper's rule): the lower-copy score must be ``>= threshold`` for ``patience``
  consecutive evaluations, counting only evaluations whose training fraction lies inside
  ``[min_frac, max_frac]``; a score below the threshold (or NaN) resets the count. The release
  happens at the evaluation that completes the patience. If nothing has fired by ``max_frac``,
  the release is forced at the first step with ``frac >= max_frac`` (checked at every step by
  :meth:`ReleaseController.on_step`, not only at evaluations).
  With ``threshold_mode: over_uniform`` the compared score is ``lower_copy / lower_copy_uniform``
  (the copy score over what uniform causal attention gives on the same positions) and the
  threshold is ``threshold_ratio``: the absolute paper threshold (0.005 at sequence length 1024)
  means something else at another sequence length, because the uniform baseline ~ 1/position
  shrinks with context; the ratio transfers. ``absolute`` (the paper's) compares ``lower_copy``
  with ``threshold``.
* ``fixed``: released at the first step with ``frac >= release_frac``.
* ``never``: the hold value for the whole run.

After the release step ``R`` the factor ramps linearly from the hold value to the final value
over ``n = round(ramp_frac * planned_steps)`` steps: ``factor(R + i) = hold + (final - hold) *
min(1, i / n)`` (``n == 0``: the final value from ``R`` on). For a multiplier rule ``hold`` is the
multiplier and ``final`` is 1.0. For the entropy-floor control the same controller drives the
penalty weight with ``hold = 1.0`` and ``final = 0.0``: full weight before the release, a linear
ramp down to zero over ``ramp_frac`` after it (the paper only says the floor is "released by the
same rule"; ramping rather than cutting mirrors the multiplier and avoids a loss discontinuity).

Steps are *completed optimizer steps* (the ``step`` column of metrics.jsonl); ``frac`` is
``step / planned_steps``. ``factor(step)`` is the factor in force for the update *after* step
``step`` (the scheduler sets it right after step ``step``), like Megatron's ``lr``.

Determinism across ranks: step-driven decisions (forced, fixed) depend only on the step count.
Maturity depends on the score, so every rank must pass the *same* score: callers pass a
globally-reduced value (``AttentionRecorder.reduce`` all-reduces and then broadcasts from rank 0,
so the value is bit-identical everywhere).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from megatron_qk.config.release import PAPER_RELEASE

if TYPE_CHECKING:
    from megatron_qk.config.optim import EntropyFloorConfig, MultiplierRuleConfig

Policy = Literal["maturity", "fixed", "never"]
ThresholdMode = Literal["absolute", "over_uniform"]
Reason = Literal["maturity", "forced", "fixed"]

# Absolute tolerance on fraction comparisons: frac is step / planned_steps, and a caller that
# computes it another way (tokens / planned tokens) must not miss a boundary by one ulp.
_FRAC_EPS = 1e-12
_STATE_VERSION = 1
ENTROPY_FLOOR_NAME = "entropy_floor"
DEFAULT_RAMP_FRAC = 0.01


@dataclass(frozen=True)
class ReleaseEvent:
    """A rule released its multiplier (one ``kind: "release"`` line in metrics.jsonl)."""

    rule: str
    reason: Reason
    step: int
    frac: float
    # The maturity score of the last evaluation the rule counted (None: none yet, or not a
    # maturity rule), the threshold it is compared with, and how it is formed.
    score: float | None = None
    threshold: float | None = None
    threshold_mode: ThresholdMode = "absolute"

    def to_dict(self) -> dict:
        """Plain dict with ``rule``, ``reason``, ``step``, ``frac``, ``score``, ``threshold``,
        ``threshold_mode``."""
        return asdict(self)


class ReleaseController:
    """Hold/release/ramp state machine for one rule (pure Python, no collectives).

    Args:
        name: rule name (``mult/<name>`` in the metrics).
        policy: ``maturity``, ``fixed`` or ``never``.
        planned_steps: planned optimizer steps of the run (fractions are relative to it).
        hold_value: factor before the release (the rule's multiplier).
        final_value: factor after the ramp (1.0 for multipliers, 0.0 for the entropy floor).
        threshold: maturity threshold on the lower-copy score (``absolute`` mode).
        patience: consecutive in-window evaluations at or above the threshold.
        min_frac: evaluations before this fraction do not count.
        max_frac: forced release at the first step with ``frac >= max_frac``.
        release_frac: fixed release point (``fixed`` only).
        ramp_frac: ramp length as a fraction of ``planned_steps``.
        threshold_mode: ``absolute`` (score = lower copy, compared with ``threshold``) or
            ``over_uniform`` (score = lower copy / its uniform-attention baseline, compared with
            ``threshold_ratio``).
        threshold_ratio: the threshold of ``over_uniform`` mode.

    Raises:
        ValueError: on an inconsistent configuration.
    """

    def __init__(
        self,
        name: str,
        policy: Policy,
        planned_steps: int,
        hold_value: float,
        final_value: float = 1.0,
        threshold: float = PAPER_RELEASE.threshold,
        patience: int = PAPER_RELEASE.patience,
        min_frac: float = PAPER_RELEASE.min_frac,
        max_frac: float = PAPER_RELEASE.max_frac,
        release_frac: float | None = None,
        ramp_frac: float = DEFAULT_RAMP_FRAC,
        threshold_mode: ThresholdMode = "absolute",
        threshold_ratio: float | None = None,
    ):
        if threshold_mode not in ("absolute", "over_uniform"):
            raise ValueError(f"rule {name!r}: unknown threshold_mode {threshold_mode!r}")
        if threshold_mode == "over_uniform" and (threshold_ratio is None or threshold_ratio <= 0):
            raise ValueError(
                f"rule {name!r}: threshold_mode over_uniform needs threshold_ratio > 0"
            )
        if policy not in ("maturity", "fixed", "never"):
            raise ValueError(f"rule {name!r}: unknown release policy {policy!r}")
        if planned_steps < 1:
            raise ValueError(f"rule {name!r}: planned_steps must be >= 1, got {planned_steps}")
        if patience < 1:
            raise ValueError(f"rule {name!r}: patience must be >= 1, got {patience}")
        if not 0.0 <= min_frac <= max_frac:
            raise ValueError(f"rule {name!r}: need 0 <= min_frac <= max_frac")
        if policy == "fixed" and release_frac is None:
            raise ValueError(f"rule {name!r}: release 'fixed' needs release_frac")
        if ramp_frac < 0:
            raise ValueError(f"rule {name!r}: ramp_frac must be >= 0, got {ramp_frac}")
        self.name = name
        self.policy: Policy = policy
        self.planned_steps = int(planned_steps)
        self.hold_value = float(hold_value)
        self.final_value = float(final_value)
        self.threshold = float(threshold)
        self.threshold_mode: ThresholdMode = threshold_mode
        self.threshold_ratio = None if threshold_ratio is None else float(threshold_ratio)
        self.patience = int(patience)
        self.min_frac = float(min_frac)
        self.max_frac = float(max_frac)
        # The first evaluation that counts is the one at the step nearest min_frac (halves up:
        # the rounding of save_at_fracs and of training.eval_interval_frac's grid), so the
        # paper's evaluation "at 3%" (step round(0.03 x 4769) = 143, 2.9985%) counts.
        self.min_step = math.floor(self.min_frac * self.planned_steps + 0.5)
        self.release_frac = None if release_frac is None else float(release_frac)
        # Python's round (half to even), as specified: round(ramp_frac * planned_steps).
        self.ramp_steps = int(round(ramp_frac * self.planned_steps))
        # Dynamic state (what state_dict saves).
        self.release_step: int | None = None
        self.release_reason: Reason | None = None
        self.streak = 0
        self.last_observed_step: int | None = None
        self.last_score: float | None = None

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_rule(cls, rule: MultiplierRuleConfig, planned_steps: int) -> ReleaseController:
        """Controller for a multiplier rule: hold ``rule.multiplier``, then ramp to 1.0."""
        return cls(
            name=rule.name,
            policy=rule.release,
            planned_steps=planned_steps,
            hold_value=rule.multiplier,
            final_value=1.0,
            threshold=rule.threshold,
            patience=rule.patience,
            min_frac=rule.min_frac,
            max_frac=rule.max_frac,
            release_frac=rule.release_frac,
            ramp_frac=rule.ramp_frac,
            threshold_mode=rule.threshold_mode,
            threshold_ratio=rule.threshold_ratio,
        )

    @classmethod
    def for_entropy_floor(
        cls, cfg: EntropyFloorConfig, planned_steps: int, ramp_frac: float = DEFAULT_RAMP_FRAC
    ) -> ReleaseController:
        """Controller for the entropy-floor weight: 1.0 until the maturity release, ramp to 0.

        The penalty is ``lam * factor(step) * max(0, h0 - H_upper)``
        (:func:`entropy_floor_penalty`). ``EntropyFloorConfig`` has no ramp length, so the
        multiplier rules' default (1% of training) is used.
        """
        return cls(
            name=ENTROPY_FLOOR_NAME,
            policy="maturity",
            planned_steps=planned_steps,
            hold_value=1.0,
            final_value=0.0,
            threshold=cfg.threshold,
            patience=cfg.patience,
            min_frac=cfg.min_frac,
            max_frac=cfg.max_frac,
            ramp_frac=ramp_frac,
            threshold_mode=cfg.threshold_mode,
            threshold_ratio=cfg.threshold_ratio,
        )

    # ---------------------------------------------------------------------------------------
    @property
    def compared_threshold(self) -> float:
        """The threshold the maturity score is compared with (``threshold`` or the ratio)."""
        if self.threshold_mode == "over_uniform":
            return self.threshold_ratio
        return self.threshold

    def maturity_score(self, lower_copy: float, lower_copy_uniform: float = math.nan) -> float:
        """The value compared with :attr:`compared_threshold` (NaN when undefined).

        ``absolute``: ``lower_copy``. ``over_uniform``: ``lower_copy / lower_copy_uniform``.
        """
        score = float(lower_copy)
        if self.threshold_mode == "absolute":
            return score
        base = float(lower_copy_uniform)
        if math.isnan(score) or math.isnan(base) or base <= 0:
            return math.nan
        return score / base

    @property
    def released(self) -> bool:
        """Whether the release has happened."""
        return self.release_step is not None

    def factor(self, step: int) -> float:
        """Factor in force after ``step`` completed optimizer steps."""
        if self.release_step is None or step < self.release_step:
            return self.hold_value
        if self.ramp_steps == 0:
            return self.final_value
        t = min(1.0, (step - self.release_step) / self.ramp_steps)
        if t >= 1.0:
            return self.final_value  # exact, not hold + (final - hold) * 1.0 with rounding
        return self.hold_value + (self.final_value - self.hold_value) * t

    def on_step(self, step: int, frac: float) -> ReleaseEvent | None:
        """Check the step-driven releases (forced at ``max_frac``, fixed at ``release_frac``).

        Call after every optimizer step (the scheduler does). Idempotent for a repeated step.
        """
        if self.released or self.policy == "never":
            return None
        if self.policy == "maturity" and frac >= self.max_frac - _FRAC_EPS:
            return self._release(step, frac, "forced")
        if self.policy == "fixed" and frac >= self.release_frac - _FRAC_EPS:
            return self._release(step, frac, "fixed")
        return None

    def observe(
        self, step: int, frac: float, lower_copy: float, lower_copy_uniform: float = math.nan
    ) -> ReleaseEvent | None:
        """Feed the (globally reduced) lower-copy score of the evaluation after ``step``.

        ``lower_copy_uniform`` (the uniform-attention baseline on the same positions) is needed
        by ``over_uniform`` rules; without it their score is NaN and never counts.

        Only ``maturity`` rules react. Evaluations before the step nearest ``min_frac`` (halves
        up) or after ``max_frac`` neither count nor reset. A score below the threshold, or NaN
        (no valid repeated-token position), resets the count. A second observation at an
        already observed step is ignored, so re-running an evaluation after a resume cannot
        count twice.

        Returns:
            The release event when this evaluation completes the patience, else None.
        """
        if self.released or self.policy != "maturity":
            return None
        if self.last_observed_step is not None and step <= self.last_observed_step:
            return None
        if step < self.min_step or frac > self.max_frac + _FRAC_EPS:
            return None
        self.last_observed_step = int(step)
        score = self.maturity_score(lower_copy, lower_copy_uniform)
        self.last_score = None if math.isnan(score) else score
        if not math.isnan(score) and score >= self.compared_threshold:
            self.streak += 1
        else:
            self.streak = 0
        if self.streak >= self.patience:
            return self._release(step, frac, "maturity")
        return None

    def _release(self, step: int, frac: float, reason: Reason) -> ReleaseEvent:
        self.release_step = int(step)
        self.release_reason = reason
        maturity = self.policy == "maturity"
        score = self.last_score if maturity else None
        return ReleaseEvent(
            rule=self.name,
            reason=reason,
            step=int(step),
            frac=float(frac),
            score=score,
            threshold=self.compared_threshold if maturity else None,
            threshold_mode=self.threshold_mode,
        )

    # ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The dynamic state as plain JSON-able values (the configuration comes from the recipe)."""
        return {
            "version": _STATE_VERSION,
            "name": self.name,
            "policy": self.policy,
            "release_step": self.release_step,
            "release_reason": self.release_reason,
            "streak": self.streak,
            "last_observed_step": self.last_observed_step,
            "last_score": self.last_score,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: when the state belongs to another rule or policy.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"rule {self.name!r}: unsupported state version {state.get('version')}"
            )
        if state["name"] != self.name or state["policy"] != self.policy:
            raise ValueError(
                f"rule {self.name!r} ({self.policy}) cannot load the state of rule "
                f"{state['name']!r} ({state['policy']})"
            )
        self.release_step = state["release_step"]
        self.release_reason = state["release_reason"]
        self.streak = int(state["streak"])
        self.last_observed_step = state["last_observed_step"]
        # Absent in checkpoints written before the score was recorded.
        self.last_score = state.get("last_score")
