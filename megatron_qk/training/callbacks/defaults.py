"""The callbacks a run of a recipe gets (:class:`~megatron_qk.training.loop.Trainer`'s default)."""

from __future__ import annotations

from pathlib import Path

from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.training.callbacks.base import Callback
from megatron_qk.training.callbacks.diagnostics import HeldOutDiagnostics
from megatron_qk.training.callbacks.entropy_floor import EntropyFloor
from megatron_qk.training.callbacks.profiler import StepProfiler
from megatron_qk.training.callbacks.qk_clip import QKClipStep
from megatron_qk.training.callbacks.releases import ReleaseLog
from megatron_qk.training.callbacks.sharp_entropy import SharpEntropyEvent
from megatron_qk.training.distributed import ParallelInfo


def default_callbacks(cfg: ExperimentConfig, info: ParallelInfo) -> list[Callback]:
    """The callbacks every run of ``cfg`` has, in the order their hooks run.

    Diagnostics run first at an evaluation: the sharp-entropy event and the maturity rules read
    the ``diag`` record they produce.
    """
    o = cfg.optim
    callbacks: list[Callback] = [StepProfiler(cfg, info.rank, Path(cfg.training.output_dir))]
    if o.qk_clip.collects:
        # First after the profiler: the clip follows optimizer.step() before anything reads
        # the weights, and the train line's max_attention_logit is set before other callbacks.
        callbacks.append(QKClipStep())
    if o.entropy_floor.enabled:
        callbacks.append(EntropyFloor(cfg))
    maturity = any(r.release == "maturity" for r in o.rules)
    if cfg.diagnostics.enabled or maturity or o.entropy_floor.enabled:
        callbacks.append(HeldOutDiagnostics())
    callbacks.append(SharpEntropyEvent(cfg.diagnostics.sharp_entropy_threshold))
    callbacks.append(ReleaseLog())
    return callbacks
