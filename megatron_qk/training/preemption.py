"""Preemption: on SIGTERM or SIGUSR1 finish the step, save, log a ``preempted`` event, exit 75.

SLURM sends SIGUSR1 ahead of the time limit when asked (``#SBATCH --signal=USR1@120``) and
SIGTERM on ``scancel`` or preemption. The handler only records the signal; the training loop polls
:meth:`PreemptionWatch.poll` after every optimizer step. The poll is a collective (max over
ranks), so all ranks stop after the same step even when the signal reaches them at different
times, and the checkpoint they save together is complete.

Exit code :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again later") tells a launcher
that the run stopped cleanly at a checkpoint and should be requeued; rerunning the same command
resumes it.
"""

from __future__ import annotations

import signal
import threading

import torch

PREEMPTED_EXIT_CODE = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptedError(Exception):
    """The run stopped at a checkpoint because a preemption signal arrived."""

    def __init__(self, step: int, signal_name: str, checkpoint: str) -> None:
        super().__init__(
            f"{signal_name} received: stopped after step {step} with checkpoint {checkpoint}; "
            "rerun the same command to resume"
        )
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


class PreemptionWatch:
    """Records the first SIGTERM/SIGUSR1 and reports it, agreed over ranks, at step ends."""

    def __init__(self) -> None:
        self.signal_number = 0
        self._previous: dict[int, object] = {}

    def install(self) -> bool:
        """Install the handlers (main thread only; returns False elsewhere, e.g. in a worker)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        """Restore the handlers found by :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if not self.signal_number:
            self.signal_number = signum

    def poll(self, device: torch.device) -> str | None:
        """The signal's name if any rank received one, else None (collective over all ranks)."""
        flag = torch.tensor([self.signal_number], dtype=torch.int64, device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        number = int(flag.item())
        return signal.Signals(number).name if number else None
