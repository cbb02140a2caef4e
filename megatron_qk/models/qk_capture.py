"""Post-RoPE Q/K capture through the layer spec.

:func:`capturing_core_attention` subclasses whatever core-attention class the layer spec uses
(Megatron's ``DotProductAttention``, Transformer Engine's, flash) so that its ``forward`` first
hands ``(query, key)`` to a probe when one is attached. Megatron calls core attention with the
queries and keys *after* RoPE and, under sequence parallelism, after the all-gather, so the probe
sees exactly what the attention kernel sees. A probe may return a replacement ``(query, key)``
(the evaluation-time Q/K ablation does). With no probe attached the cost is one attribute check
per layer. It lives beside the layer spec (:mod:`megatron_qk.models.specs`) that installs it;
:mod:`megatron_qk.diagnostics.recorder` attaches the probes.
"""

from __future__ import annotations

import math

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
                replaced = probe(self, query, key)
                if replaced is not None:
                    query, key = replaced
            return super().forward(query, key, value, *args, **kwargs)

    QKCapturingAttention.__name__ = f"QKCapturing{base_cls.__name__}"
    QKCapturingAttention.__qualname__ = QKCapturingAttention.__name__
    _CAPTURING_CLASSES[base_cls] = QKCapturingAttention
    return QKCapturingAttention


def softmax_scale(module, head_dim: int) -> float:
    """The scale the core-attention module applies to ``q . k`` (default ``1/sqrt(hn)``)."""
    scale = getattr(module, "softmax_scale", None)
    return float(scale) if scale else 1.0 / math.sqrt(head_dim)
