"""Post-RoPE Q/K capture through the layer spec.

:func:`capturing_core_attention` subclasses whatever core-attention class the layer spec uses
(Megatron's ``DotProductAttention``, Transformer Engine's, flash) so that its ``forward`` first
hands ``(query, key)`` to a probe when one is attached. Megatron calls core attention with the
queries and keys *after* RoPE and, under sequence parallelism, after the all-gather, so the probe
sees exactly what the attention kernel sees. A probe may return a replacement ``(query, key)``
(the evaluation-time Q/K ablation does). With no probe attached the cost is one attribute check
per layer. It lives beside the layer spec (:mod:`megatron_qk.models.specs`) that installs it;
:mod:`megatron_qk.diagnostics.recorder` attaches the probes.

The same seam collects the per-head max attention logit for QK-clip (on both backends; stock
Megatron collects it only in Transformer Engine's attention): with ``mqk_collect_max_logit`` set,
each forward folds the max of ``softmax_scale * q . k`` over causal positions into
``current_max_attn_logits`` (``[heads per partition]``, fp32), Megatron's own attribute, so
``SelfAttention.clip_qk`` reads it too. It is computed on the query/key actually passed to the
kernel (after a probe's replacement), independently of the probe.
"""

from __future__ import annotations

import math

import torch

# Logit elements materialised at once by max_attention_logits (fp32: 64 MiB).
_MAX_LOGIT_BLOCK = 1 << 24

_CAPTURING_CLASSES: dict[type, type] = {}


def capturing_core_attention(base_cls: type) -> type:
    """A subclass of ``base_cls`` (a core-attention module) that feeds Q/K to an attached probe."""
    if base_cls in _CAPTURING_CLASSES:
        return _CAPTURING_CLASSES[base_cls]

    class QKCapturingAttention(base_cls):
        mqk_probe = None  # set per instance by AttentionRecorder
        mqk_collect_max_logit = False  # set per instance by the QK-clip step
        current_max_attn_logits = None  # Megatron's name: [heads per partition] max logit

        def forward(self, query, key, value, *args, **kwargs):
            probe = self.mqk_probe
            if probe is not None:
                replaced = probe(self, query, key)
                if replaced is not None:
                    query, key = replaced
            if self.mqk_collect_max_logit:
                batch_max = max_attention_logits(query, key, softmax_scale(self, query.shape[-1]))
                held = self.current_max_attn_logits
                self.current_max_attn_logits = (
                    batch_max if held is None else torch.maximum(held, batch_max)
                )
            return super().forward(query, key, value, *args, **kwargs)

    QKCapturingAttention.__name__ = f"QKCapturing{base_cls.__name__}"
    QKCapturingAttention.__qualname__ = QKCapturingAttention.__name__
    _CAPTURING_CLASSES[base_cls] = QKCapturingAttention
    return QKCapturingAttention


def softmax_scale(module, head_dim: int) -> float:
    """The scale the core-attention module applies to ``q . k`` (default ``1/sqrt(hn)``)."""
    scale = getattr(module, "softmax_scale", None)
    return float(scale) if scale else 1.0 / math.sqrt(head_dim)


@torch.no_grad()
def max_attention_logits(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Per query head, the max pre-softmax logit ``scale * q . k`` over causal positions.

    Args:
        query: ``[s, b, np, hn]`` (post-RoPE, as core attention receives it).
        key: ``[s, b, ng, hn]``; each key head serves ``np / ng`` consecutive query heads.
        scale: the softmax scale of the core attention.

    Returns:
        ``[np]`` fp32, the max over batch, query positions and keys at or before them. Computed
        in blocks of query rows so at most ``_MAX_LOGIT_BLOCK`` logits exist at once.
    """
    if query.dim() != 4:  # packed (THD) sequences: no causal order across the batch to mask by
        raise ValueError(f"max-logit collection needs [s, b, np, hn] queries, got {query.shape}")
    s, b, heads, _ = query.shape
    q = query.detach().float().permute(1, 2, 0, 3)  # [b, np, s, hn]
    k = key.detach().float().permute(1, 2, 0, 3)
    k = k.repeat_interleave(heads // k.shape[1], dim=1)  # GQA: each query head's key head
    rows = max(1, _MAX_LOGIT_BLOCK // max(1, b * heads * s))
    out = torch.full((heads,), -math.inf, dtype=torch.float32, device=query.device)
    positions = torch.arange(s, device=query.device)
    for start in range(0, s, rows):
        stop = min(start + rows, s)
        logits = torch.matmul(q[:, :, start:stop], k.transpose(-1, -2)) * scale
        future = positions[None, :] > positions[start:stop, None]  # key after query: masked
        logits.masked_fill_(future, -math.inf)
        out = torch.maximum(out, logits.amax(dim=(0, 2, 3)))
    return out
