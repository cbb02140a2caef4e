"""One console line per logging interval, for logs that are files (SLURM) or a run without a bar.

The line follows Megatron-LM's ``training_log``: step/total, consumed tokens, loss, lr, grad norm,
the max attention logit (``optim.qk_clip``), ms/step, tokens/s, model TFLOP/s per GPU, MFU, peak
memory and the ETA to the run's last step, all read from the step's ``train`` record
(``metrics.jsonl`` holds the same numbers). It is written by the logging rank when the progress
bar is off or stderr is not a terminal, where a bar redrawn in place would be one line per redraw.
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable
from typing import TextIO


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def format_step_line(record: dict, total: int, eta_seconds: float | None) -> str:
    """The console line of one ``train`` record (see the module docstring)."""
    step = record["step"]
    parts = [
        f"step {step}/{total} ({100 * step / total:.1f}%)",
        f"tokens {_count(record['tokens'])}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.3e}",
    ]
    if record.get("grad_norm") is not None:
        parts.append(f"grad norm {record['grad_norm']:.3f}")
    if record.get("max_attention_logit") is not None:  # optim.qk_clip (clip or log_only)
        parts.append(f"max logit {record['max_attention_logit']:.4g}")
    parts += [
        f"{1000 * record['step_seconds']:.1f} ms/step",
        f"{_count(record['tokens_per_second'])} tok/s",
        f"{record['tflops_per_gpu']:.2f} TFLOP/s/GPU",
        f"MFU {100 * record['mfu']:.1f}%",
    ]
    if record.get("peak_memory_gib") is not None:
        parts.append(f"peak mem {record['peak_memory_gib']:.2f} GiB")
    if eta_seconds is not None:
        parts.append(f"ETA {_duration(eta_seconds)}")
    return " | ".join(parts)


class StepLog:
    """Prints :func:`format_step_line` for the records it is given (the loop's log interval).

    Args:
        enabled: print at all (the logging rank, bar off or stderr not a terminal).
        total: planned steps (the line's denominator).
        end_step: the run's last step (the ETA's target).
        start_step: the step this process starts from (a resume); the ETA averages the wall
            time of the steps run since.
        clock: seconds, monotonic (injected by tests).
        stream: where to print (default ``sys.stderr``).
    """

    def __init__(
        self,
        enabled: bool,
        total: int,
        end_step: int,
        start_step: int,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ) -> None:
        self.enabled = enabled
        self.total, self.end_step, self.start_step = total, end_step, start_step
        self._clock = clock
        self._start = clock()
        self._stream = stream

    @staticmethod
    def wanted(progress_bar: bool, stream: TextIO | None = None) -> bool:
        """Whether the lines are printed: the bar is off, or ``stream`` is not a terminal."""
        stream = sys.stderr if stream is None else stream
        return not progress_bar or not stream.isatty()

    def print(self, record: dict) -> None:
        """Print the line of one ``train`` record (nothing when disabled)."""
        if not self.enabled:
            return
        done = record["step"] - self.start_step
        eta = None
        if done > 0:
            eta = (self._clock() - self._start) / done * max(self.end_step - record["step"], 0)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        stream = sys.stderr if self._stream is None else self._stream
        print(f"[{stamp}] {format_step_line(record, self.total, eta)}", file=stream, flush=True)
