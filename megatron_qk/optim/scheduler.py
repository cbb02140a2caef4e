"""Megatron's LR scheduler with per-rule runtime factors driven by release controllers.

:class:`MultiplierScheduler` subclasses Megatron's ``OptimizerParamScheduler`` and keeps its
unit: it counts *samples* (``step(increment=global_batch_size)`` once per optimizer step), so
warmup/decay lengths are ``steps * global_batch_size``. Rule groups are recognised by the
constant ``mqk_rule`` key that :mod:`megatron_qk.optim.param_groups` puts in their group dict;
their learning rate is ``get_lr(group) * controller.factor(step)``. Nothing identifying a group
is ever changed at runtime, so checkpoint group matching stays sound (see the package
docstring); the controllers' state travels in :meth:`MultiplierScheduler.state_dict`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_qk.optim.release import ReleaseController, ReleaseEvent

if TYPE_CHECKING:
    from megatron_qk.config.schema import ExperimentConfig

logger = logging.getLogger(__name__)

RULE_KEY = "mqk_rule"
_STATE_KEY = "mqk"
_STATE_VERSION = 1
_DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "constant": "constant"}


class MultiplierScheduler(OptimizerParamScheduler):
    """Warmup + decay (Megatron's) times each rule group's release-controlled factor.

    Args:
        optimizer: the Megatron optimizer (its ``param_groups`` are read at every step, never
            cached: loading a checkpoint replaces the group dicts).
        samples_per_step: global batch size in samples (the scheduler's unit per step).
        planned_steps: planned optimizer steps (fractions of training are relative to it).
        controllers: one controller per rule, keyed by rule name; every name must tag at least
            one optimizer group and every tagged group must have a controller.
        entropy_floor: controller of the entropy-floor weight, or None when disabled.
        entropy_floor_lam: the floor's lambda (weight before the release).
        **kwargs: ``OptimizerParamScheduler`` arguments (``init_lr``, ``max_lr``, ``min_lr``,
            ``lr_warmup_steps``, ... in samples).

    Raises:
        ValueError: when rules and tagged optimizer groups do not correspond.
    """

    def __init__(
        self,
        optimizer,
        *,
        samples_per_step: int,
        planned_steps: int,
        controllers: dict[str, ReleaseController],
        entropy_floor: ReleaseController | None = None,
        entropy_floor_lam: float = 0.0,
        **kwargs,
    ):
        if samples_per_step < 1:
            raise ValueError(f"samples_per_step must be >= 1, got {samples_per_step}")
        # Set before super().__init__, which calls self.step(0).
        self.samples_per_step = int(samples_per_step)
        self.planned_steps = int(planned_steps)
        self.controllers = dict(controllers)
        self.entropy_floor = entropy_floor
        self.entropy_floor_lam = float(entropy_floor_lam)
        self._events: list[ReleaseEvent] = []
        tagged = {g[RULE_KEY] for g in optimizer.param_groups if g.get(RULE_KEY) is not None}
        missing = sorted(set(self.controllers) - tagged)
        if missing:
            raise ValueError(f"multiplier rules {missing} have no optimizer parameter group")
        unknown = sorted(tagged - set(self.controllers))
        if unknown:
            raise ValueError(f"optimizer groups tagged with unknown rules {unknown}")
        super().__init__(optimizer, **kwargs)

    # ---------------------------------------------------------------------------------------
    @property
    def optimizer_step(self) -> int:
        """Completed optimizer steps (samples counted so far // samples per step)."""
        return self.num_steps // self.samples_per_step

    def _all_controllers(self) -> list[ReleaseController]:
        extra = [self.entropy_floor] if self.entropy_floor is not None else []
        return [*self.controllers.values(), *extra]

    def step(self, increment: int) -> None:
        """Advance by ``increment`` samples, check step-driven releases, set every group's lr."""
        self.num_steps += increment
        step = self.optimizer_step
        frac = step / self.planned_steps
        for ctl in self._all_controllers():
            event = ctl.on_step(step, frac)
            if event is not None:
                self._record(event)
        self._apply()

    def _apply(self) -> None:
        """Write lr/weight_decay into every group (empty groups too, like Megatron)."""
        step = self.optimizer_step
        factors = {name: ctl.factor(step) for name, ctl in self.controllers.items()}
        for group in self.optimizer.param_groups:
            lr = self.get_lr(group)
            rule = group.get(RULE_KEY)
            if rule is not None:
                lr *= factors[rule]
            group["lr"] = lr
            group["weight_decay"] = self.get_wd(group) * group.get("wd_mult", 1.0)

    def _record(self, event: ReleaseEvent) -> None:
        logger.info(
            "release of %s at step %d (frac %.4f, %s)",
            event.rule,
            event.step,
            event.frac,
            event.reason,
        )
        self._events.append(event)

    # ---------------------------------------------------------------------------------------
    def observe_evaluation(
        self, step: int, lower_copy: float, lower_copy_uniform: float = math.nan
    ) -> list[ReleaseEvent]:
        """Feed the lower-copy score of the evaluation taken after ``step`` optimizer steps.

        ``lower_copy_uniform`` is the score's uniform-attention baseline on the same positions
        (needed by ``over_uniform`` rules). Both must be the same on every rank (as
        ``AttentionRecorder.reduce`` returns them). A release with no ramp takes effect for the
        very next update. The new events are also queued for :meth:`pop_events`; log
        only what ``pop_events`` returns so nothing is written twice.

        Raises:
            ValueError: when ``step`` is not the scheduler's current optimizer step.
        """
        if step != self.optimizer_step:
            raise ValueError(
                f"observe_evaluation(step={step}) but the scheduler is at step "
                f"{self.optimizer_step}: evaluate after scheduler.step()"
            )
        frac = step / self.planned_steps
        events = []
        for ctl in self._all_controllers():
            event = ctl.observe(step, frac, lower_copy, lower_copy_uniform)
            if event is not None:
                self._record(event)
                events.append(event)
        if events:
            self._apply()
        return events

    def maturity_score(self, lower_copy: float, lower_copy_uniform: float) -> float | None:
        """The score the run's first maturity rule compares (None when it has none)."""
        for ctl in self._all_controllers():
            if ctl.policy == "maturity":
                return ctl.maturity_score(lower_copy, lower_copy_uniform)
        return None

    def pop_events(self) -> list[ReleaseEvent]:
        """Release events since the last call (forced/fixed from ``step``, maturity from evals)."""
        events, self._events = self._events, []
        return events

    def multipliers(self) -> dict[str, float]:
        """Current factor per rule (in the groups now, i.e. for the next update; like ``lr``)."""
        step = self.optimizer_step
        return {name: ctl.factor(step) for name, ctl in self.controllers.items()}

    def entropy_floor_weight(self) -> float:
        """``lam * factor`` of the entropy floor for the next update (0.0 when disabled)."""
        if self.entropy_floor is None:
            return 0.0
        return self.entropy_floor_lam * self.entropy_floor.factor(self.optimizer_step)

    def releases(self) -> dict[str, dict]:
        """``{rule: {step, frac, reason}}`` of the releases so far (for summary.json); maturity
        rules add ``score`` (the last counted maturity score), ``threshold``, ``threshold_mode``.
        """
        out = {}
        for ctl in self._all_controllers():
            if ctl.released:
                out[ctl.name] = {
                    "step": ctl.release_step,
                    "frac": ctl.release_step / self.planned_steps,
                    "reason": ctl.release_reason,
                }
                if ctl.policy == "maturity":
                    out[ctl.name].update(
                        score=ctl.last_score,
                        threshold=ctl.compared_threshold,
                        threshold_mode=ctl.threshold_mode,
                    )
        return out

    # ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Megatron's scheduler state plus the controllers (plain JSON-able values)."""
        state = super().state_dict()
        floor = self.entropy_floor
        state[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "samples_per_step": self.samples_per_step,
            "planned_steps": self.planned_steps,
            "controllers": {name: c.state_dict() for name, c in self.controllers.items()},
            "entropy_floor": None if floor is None else floor.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore controllers first, then Megatron's fields (whose loader calls ``step``).

        Raises:
            ValueError: when the checkpoint's rules, entropy floor or step geometry differ from
                this run's.
        """
        mine = state_dict.get(_STATE_KEY)
        if mine is None:
            if self._all_controllers():
                raise ValueError(
                    "the checkpoint's scheduler has no multiplier-rule state but this run has "
                    f"rules {sorted(self.controllers)}"
                )
        else:
            if mine.get("version") != _STATE_VERSION:
                raise ValueError(f"unsupported scheduler state version {mine.get('version')}")
            for key in ("samples_per_step", "planned_steps"):
                if mine[key] != getattr(self, key):
                    raise ValueError(
                        f"checkpoint scheduler has {key}={mine[key]}, this run "
                        f"{getattr(self, key)}: resume with the same batch size and length"
                    )
            saved = mine["controllers"]
            if set(saved) != set(self.controllers):
                raise ValueError(
                    f"checkpoint has multiplier rules {sorted(saved)}, this run "
                    f"{sorted(self.controllers)}"
                )
            for name, ctl in self.controllers.items():
                ctl.load_state_dict(saved[name])
            if (mine["entropy_floor"] is None) != (self.entropy_floor is None):
                raise ValueError("entropy_floor.enabled differs between checkpoint and this run")
            if self.entropy_floor is not None:
                self.entropy_floor.load_state_dict(mine["entropy_floor"])
        self._events = []
        # Megatron's loader does step(increment=num_steps): start from zero so the count is the
        # checkpoint's even if this scheduler has already stepped.
        self.num_steps = 0
        super().load_state_dict(state_dict)


def build_scheduler(cfg: ExperimentConfig, optimizer) -> MultiplierScheduler:
    """The run's scheduler: warmup from 0, decay to ``min_lr_ratio * lr``, both x lr_multiplier.

    Lengths are in samples (steps x global batch size). Warmup is capped at ``planned - 1``
    steps because Megatron requires warmup < decay.
    """
    o, t = cfg.optim, cfg.training
    planned = cfg.planned_steps()
    gbs = t.global_batch_size
    lr = o.lr * o.lr_multiplier
    warmup_steps = min(int(round(o.warmup_frac * planned)), planned - 1)
    controllers = {r.name: ReleaseController.from_rule(r, planned) for r in o.rules}
    floor = None
    if o.entropy_floor.enabled:
        floor = ReleaseController.for_entropy_floor(o.entropy_floor, planned)
    return MultiplierScheduler(
        optimizer,
        samples_per_step=gbs,
        planned_steps=planned,
        controllers=controllers,
        entropy_floor=floor,
        entropy_floor_lam=o.entropy_floor.lam,
        init_lr=0.0,
        max_lr=lr,
        min_lr=o.min_lr_ratio * lr,
        lr_warmup_steps=warmup_steps * gbs,
        lr_decay_steps=planned * gbs,
        lr_decay_style=_DECAY_STYLES[o.decay_style],
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=planned * gbs,
        wd_incr_style="constant",
    )
