"""What a cluster user watches per train line: tokens/s, model TFLOP/s per GPU, MFU, peak memory.

The ``training.profile_steps`` torch.profiler trace is a callback:
:class:`megatron_qk.training.callbacks.profiler.StepProfiler`.
"""

from __future__ import annotations

import resource

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
