"""Post-RoPE Q/K capture through the layer spec, and the recorder that turns it into diagnostics.

:func:`capturing_core_attention` subclasses whatever core-attention class the layer spec uses
(Megatron's ``DotProductAttention``, Transformer Engine's, flash) so that its ``forward`` first
hands ``(query, key)`` to a probe when one is attached. Megatron calls core attention with the
queries and keys *after* RoPE and, under sequence parallelism, after the all-gather, so the probe
sees exactly what the attention kernel sees. With no probe attached the cost is one attribute
check per layer.

:class:`AttentionRecorder` attaches probes in two modes:

* :meth:`AttentionRecorder.statistics`: held-out batches, no grad; per-layer sums/counts of
  copy mass, entropy and logit RMS (:mod:`megatron_qk.diagnostics.probes`), reduced over all
  ranks into the ``diag`` record (lower-copy score, upper/lower entropy and logit).
* :meth:`AttentionRecorder.entropy_floor`: training batches; the differentiable mean upper-half
  entropy ``H_upper`` of each micro-batch, for the entropy-floor penalty.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from megatron_qk.diagnostics.probes import STATS, layer_statistics, normalized_entropy_sum

_CAPTURING_CLASSES: dict[type, type] = {}


def capturing_core_attention(base_cls: type) -> type:
    """A subclass of ``base_cls`` (a core-attention module) that feeds Q/K to an attached probe."""
    if base_cls in _CAPTURING_CLASSES:
        return _CAPTURING_CLASSES[base_cls]

    class QKCapturingAttention(base_cls):
        mqk_probe = None  # set per instance by AttentionRecorder

        def forward(self, query, key, value, *args, **kwargs):
            probe = self.mqk_probe
            if probe is not None:
                probe(self, query, key)
            return super().forward(query, key, value, *args, **kwargs)

    QKCapturingAttention.__name__ = f"QKCapturing{base_cls.__name__}"
    QKCapturingAttention.__qualname__ = QKCapturingAttention.__name__
    _CAPTURING_CLASSES[base_cls] = QKCapturingAttention
    return QKCapturingAttention


def _softmax_scale(module, head_dim: int) -> float:
    scale = getattr(module, "softmax_scale", None)
    return float(scale) if scale else 1.0 / math.sqrt(head_dim)


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


class AttentionRecorder:
    """Attaches Q/K probes to this rank's layers and reduces their results over all ranks.

    Args:
        model_chunks: this rank's model chunks (wrapped or bare ``GPTModel``).
        num_layers: total number of transformer layers (all pipeline stages).
        chunk_size: query rows per chunk when recomputing attention.
    """

    def __init__(self, model_chunks, num_layers: int, chunk_size: int = 256):
        self.num_layers = num_layers
        self.chunk_size = chunk_size
        self.layers: dict[torch.nn.Module, int] = {}
        for chunk in model_chunks:
            for layer in _bare(chunk).decoder.layers:
                core = layer.self_attention.core_attention
                if not hasattr(core, "mqk_probe"):
                    raise TypeError(
                        f"layer {layer.layer_number}: core attention {type(core).__name__} cannot "
                        "capture Q/K; build the model with megatron_qk.models.build_gpt_model"
                    )
                self.layers[core] = int(layer.layer_number)
        self.tokens: torch.Tensor | None = None
        self._stats: torch.Tensor | None = None
        self._entropies: list[tuple[torch.Tensor, int]] = []

    def is_upper(self, layer_number: int) -> bool:
        """Upper half: global 1-based layer number above ``num_layers / 2``."""
        return layer_number > self.num_layers / 2

    def set_tokens(self, tokens: torch.Tensor) -> None:
        """Tokens ``[b, s]`` of the micro-batch about to run forward (copy-score targets)."""
        self.tokens = tokens

    @contextlib.contextmanager
    def _attached(self, probe) -> Iterator[None]:
        for core in self.layers:
            core.mqk_probe = probe
        try:
            yield
        finally:
            for core in self.layers:
                core.mqk_probe = None
            self.tokens = None

    # -- held-out statistics -----------------------------------------------------------------
    @contextlib.contextmanager
    def statistics(self) -> Iterator[None]:
        """Accumulate per-layer statistics over the forward passes run inside the block."""
        self._stats = None

        def probe(core, query, key):
            if self.tokens is None:
                raise RuntimeError("AttentionRecorder.set_tokens was not called before forward")
            stats = layer_statistics(
                query,
                key,
                self.tokens,
                _softmax_scale(core, query.shape[-1]),
                self.chunk_size,
            )
            if self._stats is None:
                self._stats = torch.zeros(
                    self.num_layers, len(STATS), 2, dtype=torch.float64, device=stats.device
                )
            self._stats[self.layers[core] - 1] += stats

        with self._attached(probe):
            yield

    def reduce(self, device: torch.device) -> dict:
        """Combine the accumulated statistics over every rank (collective) into a diag record.

        Returns:
            ``lower_copy``, ``upper_entropy``, ``lower_entropy``, ``upper_logit``,
            ``lower_logit`` and ``layers: {layer_number: {copy, entropy, logit}}``; identical
            on every rank.
        """
        stats = torch.zeros(self.num_layers, len(STATS), 2, dtype=torch.float64, device=device)
        if self._stats is not None:
            stats += self._stats.to(device)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
            dist.broadcast(stats, src=0)  # one bit pattern everywhere: same release decision
        self._stats = None
        stats = stats.cpu()
        half = self.num_layers // 2

        def mean(rows: slice, stat: int) -> float:
            total, count = stats[rows, stat, 0].sum().item(), stats[rows, stat, 1].sum().item()
            if count == 0:
                return float("nan")
            value = total / count
            return math.sqrt(value) if STATS[stat] == "logit" else value

        lower, upper = slice(0, half), slice(half, self.num_layers)
        record = {
            "lower_copy": mean(lower, 0),
            "upper_copy": mean(upper, 0),
            "upper_entropy": mean(upper, 1),
            "lower_entropy": mean(lower, 1),
            "upper_logit": mean(upper, 2),
            "lower_logit": mean(lower, 2),
        }
        record["layers"] = {
            str(i + 1): {name: mean(slice(i, i + 1), j) for j, name in enumerate(STATS)}
            for i in range(self.num_layers)
        }
        return record

    # -- entropy floor -----------------------------------------------------------------------
    @contextlib.contextmanager
    def entropy_floor(self) -> Iterator[None]:
        """Collect the differentiable upper-half entropy of each training micro-batch."""
        self._entropies = []

        def probe(core, query, key):
            layer = self.layers[core]
            if self.is_upper(layer):
                scale = _softmax_scale(core, query.shape[-1])
                self._entropies.append(normalized_entropy_sum(query, key, scale))

        with self._attached(probe):
            yield
        self._entropies = []

    def pop_upper_entropy(self) -> torch.Tensor | None:
        """Mean normalised upper-half entropy of the micro-batch just run (differentiable).

        Heads split over tensor-parallel ranks are combined with an all-reduce whose backward is
        the identity, so each rank's gradient reaches its own heads.
        """
        if not self._entropies:
            return None
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        total = torch.stack([s for s, _ in self._entropies]).sum()
        count = float(sum(c for _, c in self._entropies))
        self._entropies = []
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            packed = torch.stack([total, total.new_tensor(count)])
            packed = reduce_from_tensor_model_parallel_region(packed)
            total, count = packed[0], packed[1].detach()
        return total / count
