"""The ``training.profile_steps`` window: a torch.profiler Chrome trace of chosen steps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.training.callbacks.base import Callback

if TYPE_CHECKING:
    from megatron_qk.training.loop import Trainer


class StepProfiler(Callback):
    """A ``torch.profiler`` trace of optimizer steps ``[first, last]`` on the chosen ranks.

    The profiler starts before step ``first`` and the Chrome trace is written when ``last``
    completes, to ``<run_dir>/profile/rank<R>_steps<first>-<last>.json`` (open in
    chrome://tracing or Perfetto). A run stopped or resumed inside the window writes nothing.

    Args:
        cfg: the recipe (``training.profile_steps``, ``training.profile_ranks``).
        rank: this process's global rank.
        run_dir: the run directory.
    """

    def __init__(self, cfg: ExperimentConfig, rank: int, run_dir: Path):
        steps = cfg.training.profile_steps
        self.window = tuple(steps) if steps and rank in cfg.training.profile_ranks else None
        self.rank = rank
        self.run_dir = Path(run_dir)
        self._prof = None
        self.trace_path: Path | None = None

    def pre_step(self, trainer: Trainer) -> None:
        if self.window is None or trainer.step + 1 != self.window[0]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self._prof.__enter__()

    def post_step(self, trainer: Trainer, record: dict) -> None:
        """Stop and write the trace after the window's last step."""
        if self._prof is None or trainer.step != self.window[1]:
            return
        self._prof.__exit__(None, None, None)
        first, last = self.window
        out = self.run_dir / "profile" / f"rank{self.rank}_steps{first}-{last}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        self._prof.export_chrome_trace(str(tmp))
        tmp.replace(out)
        self._prof = None
        self.trace_path = out

    def post_train(self, trainer: Trainer) -> None:
        """Stop a profiler left open (run ended inside the window) without writing a trace."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
