"""The causal readout: perplexity when upper-half Q, K or both are zeroed at evaluation time.

Zeroing the post-RoPE queries (or keys) of a layer makes every pre-softmax logit zero, so the
layer attends uniformly over its causal keys; the paper notes that the three variants degenerate
the upper logits the same way (Section 4, "Mechanism measurements"), so their perplexity
increases agree up to the bias terms the projections may carry. The ablation goes through the
same core-attention seam as the probes (:mod:`megatron_qk.diagnostics.capture`), so it works
with every attention backend.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch

from megatron_qk.diagnostics.recorder import AttentionRecorder

ABLATIONS = ("q", "k", "qk")


@contextlib.contextmanager
def zeroed_upper_qk(recorder: AttentionRecorder, which: str) -> Iterator[None]:
    """Zero the upper-half queries (``q``), keys (``k``) or both (``qk``) inside the block."""
    if which not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {which!r}")

    def probe(core, query, key):
        if not recorder.is_upper(recorder.layers[core]):
            return None
        return (
            torch.zeros_like(query) if "q" in which else query,
            torch.zeros_like(key) if "k" in which else key,
        )

    with recorder.attached(probe):
        yield


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token loss of a one-process model over ``batches``."""
    total, count = 0.0, 0.0
    for batch in batches:
        losses = model(
            batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
        )
        mask = batch["loss_mask"]
        total += float((losses.float() * mask).sum())
        count += float(mask.sum())
    if count == 0:
        raise ValueError("no loss tokens in the held-out batches")
    return total / count


def upper_qk_ablation(
    model: torch.nn.Module, recorder: AttentionRecorder, batches: list[dict[str, torch.Tensor]]
) -> dict:
    """Perplexity with and without each upper-half Q/K ablation.

    Returns:
        ``{"base_loss", "base_ppl", "q": {"loss", "ppl", "ppl_increase"}, "k": ..., "qk": ...}``.
    """
    base = mean_loss(model, batches)
    out: dict = {"base_loss": base, "base_ppl": math.exp(min(base, 700.0))}
    for which in ABLATIONS:
        with zeroed_upper_qk(recorder, which):
            loss = mean_loss(model, batches)
        ppl = math.exp(min(loss, 700.0))
        out[which] = {"loss": loss, "ppl": ppl, "ppl_increase": ppl - out["base_ppl"]}
    return out
