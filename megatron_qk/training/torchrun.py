"""``python -m megatron_qk.training.torchrun ARGS``: torchrun for preemptible jobs.

The differences from ``python -m torch.distributed.run``:

- the launcher ignores SIGUSR1, so SLURM's early warning (``--signal=USR1@120``, delivered to every
  process of the job step) reaches the training processes without killing their launcher first;
  the trainers install their own handler, which finishes the step and saves;
- a Ctrl-C (SIGINT to the launcher: torchrun starts each worker in its own session, so only
  the launcher gets the terminal's signal) is forwarded once to the workers, which finish their
  step and save; the launcher waits :data:`SHUTDOWN_TIMEOUT_S` for that, not torchrun's 30 s
  before SIGKILL. A second Ctrl-C ends the launcher at once, and the workers with it (each
  worker asks the kernel for SIGKILL when its launcher exits, ``megatron_qk.train``);
- when the first failing worker exited with the preempted code (75), the launcher exits 75 too
  (torchrun itself reports any worker failure as 1), so a batch script can requeue on it; after
  a Ctrl-C it exits 130.
"""

from __future__ import annotations

import signal
import sys

from megatron_qk.training.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE

# How long the launcher waits for the workers to save after a forwarded Ctrl-C or SIGTERM
# before it kills them (torchrun's default, 30 s, is shorter than a large model's save).
SHUTDOWN_TIMEOUT_S = 900


def run_torchrun(argv: list[str]) -> int:
    """Run torchrun's main with ``argv``; returns 0, 75 when preempted, 130 when interrupted.

    Raises:
        ChildFailedError: for any other worker failure (torchrun's own report).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    if not any(a.startswith(("--shutdown-timeout", "--shutdown_timeout")) for a in argv):
        argv = ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), *argv]
    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        if first.exitcode == PREEMPTED_EXIT_CODE:
            print(
                f"torchrun: training preempted (exit {PREEMPTED_EXIT_CODE}); rerun to resume",
                file=sys.stderr,
            )
            return PREEMPTED_EXIT_CODE
        if first.exitcode == INTERRUPTED_EXIT_CODE:
            return INTERRUPTED_EXIT_CODE  # the workers said what happened
        raise
    except SignalException as exc:
        if exc.sigval != signal.SIGINT:
            raise
        # torchrun forwarded the Ctrl-C and waited for the workers (they said what they saved),
        # or a second Ctrl-C cut that wait short: the workers die with this process.
        return INTERRUPTED_EXIT_CODE
    return 0


def main(argv: list[str] | None = None) -> int:
    """Ignore SIGUSR1 in the launcher, then run torchrun."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    return run_torchrun(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
