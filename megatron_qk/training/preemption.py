"""Stopping at a checkpoint on a signal: SIGTERM/SIGUSR1 (preemption, exit 75), Ctrl-C (exit 130).

SLURM sends SIGUSR1 ahead of the time limit when asked (``#SBATCH --signal=USR1@120``) and
SIGTERM on ``scancel`` or preemption. A terminal's Ctrl-C sends SIGINT to the whole foreground
process group (every torchrun worker, and the launcher). The handler only records the signal;
the training loop polls :meth:`PreemptionWatch.poll` after every optimizer step. The poll is a
collective (max over ranks), so all ranks stop after the same step even when the signal reaches
them at different times, and the checkpoint they save together is complete.

Exit code :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again later") tells a launcher
that the run stopped cleanly at a checkpoint and should be requeued; rerunning the same command
resumes it. A Ctrl-C stops the same way with :data:`INTERRUPTED_EXIT_CODE` (130, the shell's
code for SIGINT), so a batch script does not requeue a run its user stopped. The first Ctrl-C
restores SIGINT's default action: a second one ends the process at once, in the kernel, without
saving and without a traceback, even while the process waits in a collective or a C call.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

PREEMPTED_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130
# In the order a disagreement between ranks is settled (max over ranks): a Ctrl-C anywhere wins.
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class PreemptedError(Exception):
    """The run stopped at a checkpoint because a preemption signal or a Ctrl-C arrived."""

    def __init__(self, step: int, signal_name: str, checkpoint: str) -> None:
        if signal_name == "SIGINT":
            message = (
                f"interrupted at step {step}, checkpoint saved; run the same command to resume "
                f"(checkpoint {checkpoint})"
            )
        else:
            message = (
                f"{signal_name} received: stopped after step {step} with checkpoint "
                f"{checkpoint}; rerun the same command to resume"
            )
        super().__init__(message)
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint

    @property
    def exit_code(self) -> int:
        """130 for a Ctrl-C, 75 (requeue) for a preemption."""
        return INTERRUPTED_EXIT_CODE if self.signal_name == "SIGINT" else PREEMPTED_EXIT_CODE


def _is_logging_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1/SIGINT and reports them, agreed over ranks, at step ends.

    Attributes:
        signal_number: the highest-ranked signal received so far (0: none), in the order of
            :data:`PREEMPT_SIGNALS`.
        received: how many of the watched signals arrived.
    """

    def __init__(self) -> None:
        self.signal_number = 0
        self.received = 0
        self._previous: dict[int, object] = {}

    def install(self) -> bool:
        """Install the handlers (main thread only; returns False elsewhere, e.g. in a worker)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in PREEMPT_SIGNALS:
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started in the background of a script (nohup, &): stays ignored
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        """Restore the handlers found by :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.received += 1
        if PREEMPT_SIGNALS.index(signum) > _rank_of(self.signal_number):
            self.signal_number = signum
        if signum == signal.SIGINT:
            # The next Ctrl-C ends the process in the kernel (no handler that a hung C call or
            # collective could delay, no traceback).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if _is_logging_process():
                os.write(
                    2,
                    b"\nmegatron-qk train: Ctrl-C: finishing this step, then saving a checkpoint"
                    b" (Ctrl-C again stops at once without saving)\n",
                )

    def poll(self, device: torch.device) -> str | None:
        """The signal's name if any rank received one, else None (collective over all ranks).

        When ranks received different signals, every rank reports the highest-ranked one.
        """
        flag = torch.tensor([_rank_of(self.signal_number) + 1], dtype=torch.int64, device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        index = int(flag.item()) - 1
        return PREEMPT_SIGNALS[index].name if index >= 0 else None


def _rank_of(signal_number: int) -> int:
    """Position of ``signal_number`` in :data:`PREEMPT_SIGNALS` (-1: none)."""
    for i, sig in enumerate(PREEMPT_SIGNALS):
        if sig == signal_number:
            return i
    return -1
