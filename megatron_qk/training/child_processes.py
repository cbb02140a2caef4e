"""Forked helpers (checkpoint writers, data workers) die with the trainer that forked them.

Megatron's distributed-checkpoint writer forks worker processes (``fork`` context); if the
trainer is killed while they run they become orphans holding hundreds of MB. After every
``os.fork`` in this process the child asks the Linux kernel for SIGKILL when its parent exits
(``prctl(PR_SET_PDEATHSIG)``), and exits at once if the parent is already gone. Elsewhere
(not Linux) this is a no-op.

The kernel ties the signal to the *thread* that forked: a child forked from a short-lived thread
would be killed when that thread ends. megatron-qk saves checkpoints synchronously from the main
thread, so its writers are forked there; keep it so if asynchronous saving is ever added.
"""

from __future__ import annotations

import os
import sys

from megatron_qk.rundir.parent_death import die_with_parent as _die_with_parent

_installed = False


def die_with_parent() -> bool:
    """Ask the kernel for SIGKILL when this process's parent exits (Linux only).

    A torchrun worker calls it: torchrun starts workers in their own sessions, so when a second
    Ctrl-C ends the launcher at once nothing else would end its workers.

    Returns:
        True when the request was made.
    """
    if not sys.platform.startswith("linux"):
        return False
    _die_with_parent(os.getppid())
    return True


def _record_parent() -> None:
    _fork_parent_pid[0] = os.getpid()


def make_forked_children_die_with_parent() -> bool:
    """Install the after-fork hook once per process (Linux only).

    Returns:
        True when the hook is (already) installed.
    """
    global _installed
    if not sys.platform.startswith("linux"):
        return False
    if not _installed:
        os.register_at_fork(
            before=_record_parent,
            after_in_child=lambda: _die_with_parent(_fork_parent_pid[0]),
        )
        _installed = True
    return True


# The pid of the process that is forking, recorded just before each fork.
_fork_parent_pid = [os.getpid()]
