"""Logging sinks of a run: metrics.jsonl (the contract), TensorBoard, W&B, the progress bar.

Only the logging rank writes. ``metrics.jsonl`` is append-only and flushed per line, so an
interrupted run keeps every line it wrote; on resume, lines from steps after the checkpoint are
dropped first so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from megatron_qk.config.extras import require
from megatron_qk.rundir.atomic import write_text_atomic

logger = logging.getLogger(__name__)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite_or_null(value: Any) -> Any:
    """NaN/inf floats as None (JSON null): strict JSON parsers reject bare ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


def truncate_metrics(path: Path, keep_through_step: int) -> int:
    """Drop lines with ``step > keep_through_step`` (those come after the resumed checkpoint).

    Returns:
        The number of lines removed.
    """
    if not path.exists():
        return 0
    kept, removed = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            removed += 1  # a line cut by a kill mid-write
            continue
        if step > keep_through_step:
            removed += 1
        else:
            kept.append(line)
    write_text_atomic(path, "".join(x + "\n" for x in kept))
    return removed


class MetricsSinks:
    """Fan-out of metric records to metrics.jsonl, TensorBoard and W&B (logging rank only)."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool,
        wandb_mode: str,
        wandb_project: str,
        run_name: str,
        config_dict: dict,
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb_mode != "disabled":
            wandb = require("wandb", f"logging.wandb: {wandb_mode}")
            self._wandb = wandb.init(
                project=wandb_project,
                name=run_name,
                mode=wandb_mode,
                dir=str(run_dir),
                config=config_dict,
                resume="allow",
            )

    def write(self, record: dict) -> None:
        """Append one record (must have ``kind`` and ``step``) to every sink."""
        if not self.enabled:
            return
        line = json.dumps(_finite_or_null(record), default=_json_default, allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {}
        for key, value in record.items():
            if key in ("kind", "step") or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                scalars[f"{record['kind']}/{key}"] = value
            elif key == "layers" and isinstance(value, dict):
                for layer, stats in value.items():
                    for name, v in stats.items():
                        if isinstance(v, int | float) and not isinstance(v, bool):
                            scalars[f"{record['kind']}/L{layer}/{name}"] = v
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close every sink."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class _Discard(io.StringIO):
    """tqdm's own output in a file: discarded (the bar writes whole lines there itself)."""

    def write(self, text: str) -> int:
        return len(text)


class ProgressBar:
    """Rank-0 tqdm bar showing loss, tokens/s, MFU, lr and ETA (tqdm computes the ETA).

    The bar times its own redraws: tqdm never draws on :meth:`update` (its ``mininterval`` is
    infinite); the bar redraws when ``interval`` seconds of ``clock`` have passed since the
    last draw. On a terminal (0.5 s) tqdm redraws in place. In a file (a SLURM log; 30 s) every
    redraw is one whole line, so it sits between the per-interval lines of
    :class:`~megatron_qk.training.console.StepLog` instead of running into them. The postfix
    is set without a redraw before the step is counted, so every drawn bar shows the loss of
    the step it counts.

    Args:
        enabled: draw a bar (False: :meth:`write` logs lines instead, on the logging rank).
        total: planned steps.
        initial: the step the run starts from (a resume).
        desc: the bar's label.
        log_lines: log :meth:`write`'s lines when the bar is off (the logging rank only).
        clock: seconds, monotonic (injected by tests).
        stream: where to draw (default ``sys.stderr``).
    """

    def __init__(
        self,
        enabled: bool,
        total: int,
        initial: int,
        desc: str,
        log_lines: bool = True,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ):
        self._bar = None
        # Only the logging rank logs lines when the bar is off (other ranks would repeat them).
        self._log_lines = log_lines
        self._clock = clock
        self._stream = sys.stderr if stream is None else stream
        self._in_place = self._stream.isatty()
        self.interval = 0.5 if self._in_place else 30.0
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=self._in_place,
                ncols=None if self._in_place else 120,
                file=self._stream if self._in_place else _Discard(),
                # Never on update(): the redraws are timed here. miniters=1 keeps tqdm's monitor
                # thread from forcing a redraw of its own.
                mininterval=math.inf,
                miniters=1,
            )
        self._last_draw = clock()

    def _draw(self) -> None:
        if self._in_place:
            self._bar.refresh()
        else:
            print(str(self._bar), file=self._stream, flush=True)

    def update(self, record: dict) -> None:
        """Count one step (its ``train`` record) and redraw if the interval has passed."""
        if self._bar is None:
            return
        postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_second']:,.0f}"}
        if record.get("mfu") is not None:
            postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
        postfix["lr"] = f"{record['lr']:.2e}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)
        now = self._clock()
        if now - self._last_draw >= self.interval:
            self._draw()
            self._last_draw = now

    def write(self, text: str) -> None:
        """Print a line above the bar (or log it when the bar is off)."""
        if self._bar is not None:
            self._bar.write(text)
        elif self._log_lines:
            logger.info(text)

    def close(self) -> None:
        """Close the bar (its final state is drawn once)."""
        if self._bar is not None:
            if not self._in_place:
                self._draw()
            self._bar.close()
