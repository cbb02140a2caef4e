"""A pause point for testing signals: hold a preprocess run at a named event until one arrives.

Signal tests used to start ``megatron-qk preprocess``, watch its manifest and send the signal as
soon as it showed progress: on a fast, quiet machine the run had already finished (exit 0, not
130), under load the signal could land during start-up. With ``MQK_PREPROCESS_PAUSE_AT=EVENT[:N]``
in the environment, the CLI holds the run at the ``N``-th (default first) occurrence of ``EVENT``,
prints one line ``preprocess: paused at EVENT:N (pid P)`` on stderr and waits there until a
signal is delivered; the signal then takes its normal course (SIGINT: the usual interruption
path, commit and exit 130). The test reads the line, sends the signal, and nothing races.

Events (see :func:`megatron_qk.data.pipeline.preprocess`): ``commit`` (the first commit is the
empty one at the start of a fresh run), ``workers_started`` (every pool worker exists) and
``finalizing``. Unset, nothing changes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from megatron_qk.data.readers import PreprocessError

PAUSE_ENV = "MQK_PREPROCESS_PAUSE_AT"
EVENTS = ("commit", "workers_started", "finalizing")
MAX_PAUSE_SECONDS = 600.0
"""A pause that no signal ends fails the run instead of holding it forever."""

EventHook = Callable[[str, dict[str, Any]], None]


def parse_pause(value: str) -> tuple[str, int]:
    """``"EVENT[:N]"`` -> ``(EVENT, N)``.

    Raises:
        ValueError: naming the variable, for an unknown event or a count below 1.
    """
    event, _, count = value.partition(":")
    if event not in EVENTS:
        raise ValueError(f"{PAUSE_ENV}={value!r}: unknown event {event!r} (one of {EVENTS})")
    try:
        n = int(count) if count else 1
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{PAUSE_ENV}={value!r}: the count after ':' must be an integer >= 1")
    return event, n


def _hold_until_signal(label: str) -> None:
    """Announce the pause, then wait; a signal's Python handler runs (and raises) in the loop.

    The wait is a short sleep in a loop rather than ``signal.pause()``: a signal delivered between
    the announcement and the blocking call, or to another thread, would leave ``pause()`` waiting
    forever, whereas the loop runs the handler at its next iteration.
    """
    print(f"preprocess: paused at {label} (pid {os.getpid()})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + MAX_PAUSE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise PreprocessError(f"{PAUSE_ENV}: paused at {label}, but no signal came in 600 s")


def pause_hook_from_env(environ: dict[str, str] | None = None) -> EventHook | None:
    """The ``on_event`` hook that ``MQK_PREPROCESS_PAUSE_AT`` asks for, or ``None`` when unset."""
    value = (os.environ if environ is None else environ).get(PAUSE_ENV, "")
    if not value:
        return None
    event, n = parse_pause(value)
    seen = [0]

    def hook(kind: str, payload: dict[str, Any]) -> None:
        if kind == event:
            seen[0] += 1
            if seen[0] == n:
                _hold_until_signal(f"{event}:{n}")

    return hook
