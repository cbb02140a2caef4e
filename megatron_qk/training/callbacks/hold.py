"""Fault injection for the signal tests: hold the run at a known step until a signal arrives.

A test that interrupts a real training process must not race the work it interrupts: with
``MQK_FAULT_HOLD_AT_STEP=N`` every rank, at the end of step N (before the preemption poll),
writes ``held-rank<R>`` into the directory ``MQK_FAULT_HOLD_READY`` and waits there until its
:class:`~megatron_qk.training.preemption.PreemptionWatch` has received
``MQK_FAULT_HOLD_SIGNALS`` signals (default 1). The test waits for the files, then sends a real
signal to the real process (or its process group). Unset, nothing is added to a run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_qk.training.callbacks.base import Callback
from megatron_qk.training.preemption import PreemptionWatch

if TYPE_CHECKING:
    from megatron_qk.training.loop import Trainer

HOLD_AT_STEP_ENV = "MQK_FAULT_HOLD_AT_STEP"
HOLD_READY_ENV = "MQK_FAULT_HOLD_READY"
HOLD_SIGNALS_ENV = "MQK_FAULT_HOLD_SIGNALS"
# A forgotten hold must not keep a job forever.
HOLD_TIMEOUT_S = 900.0


class HoldForSignal(Callback):
    """Waits at the end of ``step`` until ``watch`` has received ``signals`` signals.

    Args:
        watch: the run's installed signal watch.
        step: the step to hold after.
        ready_dir: where ``held-rank<R>`` is written when the hold starts.
        signals: how many signals end the hold.
    """

    def __init__(self, watch: PreemptionWatch, step: int, ready_dir: Path, signals: int = 1):
        self.watch, self.step, self.ready_dir, self.signals = watch, step, ready_dir, signals

    def end_of_step(self, trainer: Trainer) -> None:
        """Hold after the chosen step (a no-op at every other step)."""
        if trainer.step != self.step:
            return
        self.ready_dir.mkdir(parents=True, exist_ok=True)
        (self.ready_dir / f"held-rank{trainer.info.rank}").write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        # The signal handler runs between these sleeps (a signal interrupts the sleep itself).
        while self.watch.received < self.signals:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{HOLD_AT_STEP_ENV}: no signal arrived within {HOLD_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.01)


def hold_from_env(watch: PreemptionWatch) -> HoldForSignal | None:
    """The hold the environment asks for (see the module docstring), else None."""
    step = os.environ.get(HOLD_AT_STEP_ENV)
    if not step:
        return None
    ready = Path(os.environ.get(HOLD_READY_ENV, "."))
    return HoldForSignal(watch, int(step), ready, int(os.environ.get(HOLD_SIGNALS_ENV, "1")))
