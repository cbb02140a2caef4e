"""The entropy floor (Appendix D): a penalty on low upper-half attention entropy in the loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.models.layers import first_upper_layer
from megatron_qk.training.callbacks.base import Callback
from megatron_qk.training.losses import entropy_floor_penalty

if TYPE_CHECKING:
    from megatron_qk.diagnostics.recorder import AttentionRecorder
    from megatron_qk.training.loop import Trainer


def check_entropy_floor_layout(cfg: ExperimentConfig) -> None:
    """The entropy floor adds its penalty in the loss, so every upper layer must be on the last
    pipeline stage (true for PP=1 and for PP=2 with an even layer count).

    Raises:
        ConfigError: naming the pipeline size when an upper layer sits on an earlier stage.
    """
    layers, pp = cfg.model.num_layers, cfg.parallel.pipeline_model_parallel_size
    first_on_last_stage = layers - layers // pp + 1
    first_upper = first_upper_layer(layers)
    if first_on_last_stage > first_upper:
        raise ConfigError(
            "parallel.pipeline_model_parallel_size",
            f"optim.entropy_floor needs all upper-half layers ({first_upper}-{layers}) on "
            f"the last pipeline stage, but with PP={pp} it starts at layer {first_on_last_stage}",
        )


class EntropyFloor(Callback):
    """Adds ``lam * factor * max(0, h0 - H_upper)`` to each training micro-batch's loss.

    The weight comes from the scheduler's entropy-floor controller (released like a multiplier
    rule); while it is zero the step runs without the probes and with the plain loss.

    Args:
        cfg: the recipe (``optim.entropy_floor`` enabled).

    Raises:
        ConfigError: when an upper layer is not on the last pipeline stage.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        check_entropy_floor_layout(cfg)
        self.h0 = cfg.optim.entropy_floor.h0

    @contextlib.contextmanager
    def forward_backward(self, trainer: Trainer) -> Iterator[None]:
        weight = trainer.scheduler.entropy_floor_weight()
        if weight <= 0:
            yield
            return
        recorder = trainer.recorder
        trainer.loss_penalty = lambda: self._penalty(recorder, weight)
        try:
            with recorder.entropy_floor():
                yield
        finally:
            trainer.loss_penalty = None

    def _penalty(self, recorder: AttentionRecorder, weight: float) -> torch.Tensor | None:
        """The penalty of the micro-batch just run forward (None before its first upper layer)."""
        upper_entropy = recorder.pop_upper_entropy()
        if upper_entropy is None:
            return None
        return entropy_floor_penalty(upper_entropy, self.h0, weight)
