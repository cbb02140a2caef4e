"""``python -m megatron_qk.training.torchrun ARGS``: torchrun for preemptible jobs.

Two differences from ``python -m torch.distributed.run``:

- the launcher ignores SIGUSR1, so SLURM's early warning (``--signal=USR1@120``, delivered to every
  process of the job step) reaches the training processes without killing their launcher first;
  the trainers install their own handler, which finishes the step and saves;
- when the first failing worker exited with the preempted code (75), the launcher exits 75 too
  (torchrun itself reports any worker failure as 1), so a batch script can requeue on it.
"""

from __future__ import annotations

import signal
import sys

from megatron_qk.training.preemption import PREEMPTED_EXIT_CODE


def run_torchrun(argv: list[str]) -> int:
    """Run torchrun's main with ``argv``; returns 0, or 75 when the run was preempted.

    Raises:
        ChildFailedError: for any other worker failure (torchrun's own report).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

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
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    """Ignore SIGUSR1 in the launcher, then run torchrun."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    return run_torchrun(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
