"""A child process asks the kernel to kill it when its parent dies (Linux ``PR_SET_PDEATHSIG``).

Helpers started by a long job (checkpoint writers, tokenizer workers) must not outlive it: when
the job is killed they would be left running with parent 1, holding CPUs and memory. The call is
made in the child. The kernel ties the signal to the parent *thread* that created the child, so
children must be started from a thread that lives as long as the job (the main thread).
Stdlib only, so every layer can use it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """In a child: get SIGKILL when the parent exits; exit now if ``parent_pid`` is already gone.

    Args:
        parent_pid: the pid of the process that started this one (recorded before the start:
            if the parent died before the call, ``os.getppid()`` already names another process).

    Returns:
        True when the kernel accepted the request (Linux), False elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        accepted = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    return accepted
