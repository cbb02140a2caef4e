"""What a cluster user watches per train line: tokens/s, model TFLOP/s per GPU, MFU, peak memory;
and the ``training.profile_steps`` torch.profiler trace."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.models.flops import flops_per_token, throughput_fields


def peak_memory_gib() -> float:
    """Peak memory of this process so far, GiB: CUDA allocator peak on GPU, peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class ThroughputMeter:
    """Turns a step's wall time into the throughput fields of its train line."""

    def __init__(self, cfg: ExperimentConfig, padded_vocab_size: int, world_size: int):
        self.tokens_per_step = cfg.tokens_per_step()
        self.flops_per_token = flops_per_token(cfg.model, padded_vocab_size)
        self.world_size = world_size
        self.peak_tflops = cfg.logging.peak_tflops_per_gpu

    def fields(self, seconds: float) -> dict[str, float]:
        """``tokens_per_second``, ``tflops_per_gpu``, ``mfu``, ``peak_memory_gib``."""
        out = throughput_fields(
            self.tokens_per_step, seconds, self.flops_per_token, self.world_size, self.peak_tflops
        )
        out["peak_memory_gib"] = peak_memory_gib()
        return out


class StepProfiler:
    """A ``torch.profiler`` trace of optimizer steps ``[first, last]`` on the chosen ranks.

    Call :meth:`before_step` with the number of the step about to run and :meth:`after_step`
    with the number it completed; the Chrome trace is written when ``last`` completes, to
    ``<run_dir>/profile/rank<R>_steps<first>-<last>.json`` (open in chrome://tracing or
    Perfetto). A run stopped or resumed inside the window writes nothing.
    """

    def __init__(self, cfg: ExperimentConfig, rank: int, run_dir: Path):
        steps = cfg.training.profile_steps
        self.window = tuple(steps) if steps and rank in cfg.training.profile_ranks else None
        self.rank = rank
        self.run_dir = Path(run_dir)
        self._prof = None
        self.trace_path: Path | None = None

    def before_step(self, step: int) -> None:
        if self.window is None or step != self.window[0]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self._prof.__enter__()

    def after_step(self, step: int) -> Path | None:
        """Stop and write the trace after the window's last step; returns its path then."""
        if self._prof is None or step != self.window[1]:
            return None
        self._prof.__exit__(None, None, None)
        first, last = self.window
        out = self.run_dir / "profile" / f"rank{self.rank}_steps{first}-{last}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        self._prof.export_chrome_trace(str(tmp))
        tmp.replace(out)
        self._prof = None
        self.trace_path = out
        return out

    def close(self) -> None:
        """Stop a profiler left open (run ended inside the window) without writing a trace."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
