"""Release lines: the multiplier rules' releases, as the scheduler decides them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from megatron_qk.rundir.records import release_record
from megatron_qk.training.callbacks.base import Callback

if TYPE_CHECKING:
    from megatron_qk.optim.release import ReleaseEvent
    from megatron_qk.training.loop import Trainer


class ReleaseLog(Callback):
    """Feeds evaluations to the scheduler's maturity rules and logs every release.

    The scheduler is the one record of the releases (its state is in the checkpoint;
    ``scheduler.releases()`` gives the summary's), so this callback keeps none.
    Forced and fixed releases happen in ``scheduler.step`` and are logged after the step;
    maturity releases follow the evaluation whose ``diag`` completes the patience.
    """

    def post_step(self, trainer: Trainer, record: dict) -> None:
        for event in trainer.scheduler.pop_events():
            trainer.log(self._record(trainer, event))

    def on_eval(self, trainer: Trainer, record: dict) -> None:
        diag = trainer.last_diag
        if diag is None:
            return
        uniform = diag.get("lower_copy_uniform", math.nan)
        trainer.scheduler.observe_evaluation(trainer.step, diag["lower_copy"], uniform)
        for event in trainer.scheduler.pop_events():
            line = self._record(trainer, event)
            trainer.log(line)
            trainer.announce(f"release {line['rule']} ({line['reason']}) at step {line['step']}")

    @staticmethod
    def _record(trainer: Trainer, event: ReleaseEvent) -> dict:
        return release_record(
            trainer.position(event.step),
            rule=event.rule,
            reason=event.reason,
            score=event.score,
            threshold=event.threshold,
            threshold_mode=event.threshold_mode,
        )
