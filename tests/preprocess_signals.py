"""Start ``megatron-qk preprocess`` held at a named event, for signal tests that race nothing.

The CLI reads ``MQK_PREPROCESS_PAUSE_AT`` (``megatron_qk.data.fault_injection``): at the event it
prints ``preprocess: paused at ...`` on stderr and waits for a signal. :class:`PausedRun` waits
for that line (bounded), so the signal is always sent while the run is mid-way, whatever the load.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from pathlib import Path

from megatron_qk.data.fault_injection import PAUSE_ENV

PAUSE_LINE = "preprocess: paused at "


class PausedRun:
    """A preprocess CLI process in its own session, held at ``pause`` (``EVENT[:N]``).

    Args:
        cmd: the command line.
        pause: value of ``MQK_PREPROCESS_PAUSE_AT``.
        timeout: seconds to wait for the pause line (a bound, not a timing assumption).
    """

    def __init__(self, cmd: list[str], pause: str, timeout: float = 300.0) -> None:
        env = {**os.environ, PAUSE_ENV: pause}
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._wait_for_pause(timeout)
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def _wait_for_pause(self, timeout: float) -> None:
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no pause line in {timeout} s:\n{self.stderr}") from None
            if line is None:
                raise AssertionError(f"the run ended before pausing:\n{self.stderr}")
            if line.startswith(PAUSE_LINE):
                return

    @property
    def pid(self) -> int:
        """The CLI's process id (also its process group id)."""
        return self.proc.pid

    @property
    def stderr(self) -> str:
        """What the process wrote to stderr so far."""
        return "".join(self.lines)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the whole process group, as a terminal's Ctrl-C does."""
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 300.0) -> tuple[int, str]:
        """Wait for the exit; returns ``(returncode, stderr)``."""
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        return rc, self.stderr

    def kill(self) -> None:
        """Kill the process group (cleanup after a failure)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def cmdline(pid: int) -> str:
    """The command line of ``pid`` (empty once it has exited)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""
