"""Stop cleanly on SIGTERM/SIGUSR1: save, log a ``preempted`` event, raise PreemptedError."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_qk.rundir.layout import latest_checkpoint
from megatron_qk.rundir.records import event_record
from megatron_qk.training.callbacks.base import Callback
from megatron_qk.training.preemption import PreemptedError, PreemptionWatch

if TYPE_CHECKING:
    from megatron_qk.training.loop import Trainer


class StopOnPreemption(Callback):
    """Polls a :class:`~megatron_qk.training.preemption.PreemptionWatch` after every step.

    The poll is collective, so all ranks stop after the same step with one complete checkpoint.
    At the last planned step the run finishes instead (final save and summary).

    Args:
        watch: the installed signal watch.
    """

    def __init__(self, watch: PreemptionWatch) -> None:
        self.watch = watch

    def end_of_step(self, trainer: Trainer) -> None:
        """Raises PreemptedError (after saving) when any rank got the signal."""
        signal_name = self.watch.poll(trainer.info.device)
        if signal_name is None or trainer.step >= trainer.planned_steps:
            return
        if trainer.saved_step != trainer.step:
            path = trainer.save()
        else:
            path = latest_checkpoint(trainer.run_dir / "checkpoints")
        trainer.log(
            event_record("preempted", trainer.position(), signal=signal_name, checkpoint=str(path))
        )
        trainer.announce(f"{signal_name}: saved {path} after step {trainer.step}; stopping")
        raise PreemptedError(trainer.step, signal_name, str(path))
