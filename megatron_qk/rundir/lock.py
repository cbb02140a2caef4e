"""An advisory lock that keeps two trainings out of one run directory.

The lock is ``fcntl.flock`` on ``RUN_DIR/run.lock``, held open for the life of the training. The
kernel drops it when the holder exits for any reason (including SIGKILL or a node reboot of a
local filesystem), so a killed job never leaves a stale lock behind; the file itself is only a
place to record who holds it (host, pid, start time) for the refusal message.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from megatron_qk.rundir.layout import LOCK_FILE


class RunDirBusyError(RuntimeError):
    """Another live process holds the run directory's lock."""


def _holder_text() -> str:
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"host={socket.gethostname()} pid={os.getpid()} since={started}\n"


class RunDirLock:
    """Exclusive, non-blocking lock on a run directory.

    Args:
        run_dir: the run directory (created if missing).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock and record this process as its holder.

        Raises:
            RunDirBusyError: naming the holder (host, pid) when another process has it.
        """
        if self._file is not None:
            return
        # Private from the start, like the trainer's own creation (docs/SECURITY.md).
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # "a+" does not truncate: the holder's record stays readable until we own the lock.
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown holder"
            f.close()
            raise RunDirBusyError(
                f"{self.run_dir} is in use by another training ({holder}); wait for it to end, "
                "or give this run another training.output_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(_holder_text())
        f.flush()
        self._file = f

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays; it is only a holder record."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
