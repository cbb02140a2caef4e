"""The causal readout: perplexity when upper-half Q, K or both are zeroed at evaluation time.

Zeroing the post-RoPE queries (or keys) of a layer makes every pre-softmax logit zero, so the
layer attends uniformly over its causal keys; the paper notes that the three variants degenerate
the upper logits the same way (Section 4, "Mechanism measurements"), so their perplexity
increases agree up to the bias terms the projections may carry. The ablation goes through the
same core-attention seam as the probes (:mod:`megatron_qk.models.qk_capture`), so it works
with every attention backend.

*Standard error.* The readout is a difference of perplexities on the same sequences, so the
sequences are the sampling unit and the error is paired. With per-sequence loss sums ``s_i``
and token counts ``n_i`` the perplexity is ``exp(L)``, ``L = sum(s_i) / sum(n_i)``; by the delta
method the ablated-minus-base increase ``D = exp(L_a) - exp(L_b)`` has per-sequence influence
``psi_i = [exp(L_a) (s_a,i - L_a n_i) - exp(L_b) (s_b,i - L_b n_i)] / mean(n)`` and standard
error ``sqrt(sum(psi_i^2) / (N (N - 1)))`` over ``N`` sequences.

*Sample size.* The paper's smallest ablation effect at 270M is +0.35 ppl (the intervention at
3%, Section 5.3). :data:`TARGET_SE` is 10% of it: sequences are added a batch at a time until
every ablation's standard error is below the target (at least ``min_sequences``) or the sample
is used up; the report says how many sequences were read and whether the target was met.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch

from megatron_qk.diagnostics.ablation_budget import TARGET_SE  # noqa: F401 (re-exported)
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
def sequence_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence next-token loss sums and token counts (float64, CPU) of one batch."""
    losses = model(
        batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
    )
    mask = batch["loss_mask"].float()
    sums = (losses.float() * mask).sum(dim=1).double().cpu()
    return sums, mask.sum(dim=1).double().cpu()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token loss of a one-process model over ``batches``."""
    total, count = 0.0, 0.0
    for batch in batches:
        sums, counts = sequence_losses(model, batch)
        total += float(sums.sum())
        count += float(counts.sum())
    if count == 0:
        raise ValueError("no loss tokens in the held-out batches")
    return total / count


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def ppl_increase_se(
    base_sums: torch.Tensor, ablated_sums: torch.Tensor, counts: torch.Tensor
) -> tuple[float, float]:
    """Perplexity increase (ablated minus base) and its paired delta-method standard error.

    Args:
        base_sums, ablated_sums: per-sequence loss sums ``[N]`` on the same sequences.
        counts: per-sequence token counts ``[N]``.

    Returns:
        ``(increase, standard_error)``; the error is NaN for fewer than two sequences.
    """
    total = float(counts.sum())
    if total == 0:
        raise ValueError("no loss tokens in the held-out batches")
    loss_b, loss_a = float(base_sums.sum()) / total, float(ablated_sums.sum()) / total
    ppl_b, ppl_a = _ppl(loss_b), _ppl(loss_a)
    n = counts.numel()
    if n < 2:
        return ppl_a - ppl_b, math.nan
    mean_n = total / n
    psi = (
        ppl_a * (ablated_sums - loss_a * counts) - ppl_b * (base_sums - loss_b * counts)
    ) / mean_n
    return ppl_a - ppl_b, math.sqrt(float((psi**2).sum()) / (n * (n - 1)))


def upper_qk_ablation(
    model: torch.nn.Module,
    recorder: AttentionRecorder,
    batches: Iterable[dict[str, torch.Tensor]],
    target_se: float | None = None,
    min_sequences: int = 0,
    ablations: tuple[str, ...] = ABLATIONS,
) -> dict:
    """Perplexity with and without each upper-half Q/K ablation, with standard errors.

    Args:
        model: a one-process model.
        recorder: an ``AttentionRecorder`` on ``model``.
        batches: held-out batches, read in order.
        target_se: stop reading batches once every ablation's standard error is below this
            (and ``min_sequences`` are read); None reads all of them.
        min_sequences: read at least this many sequences before stopping early.
        ablations: which of ``q``, ``k``, ``qk`` to run (each costs one forward pass per
            batch; all three give all-zero upper logits, so one of them measures the same).

    Returns:
        ``{"base_loss", "base_ppl", "sequences", "tokens", "target_se", "target_met",
        "q": {"loss", "ppl", "ppl_increase", "ppl_increase_se"}, "k": ..., "qk": ...}``
        (the keys of ``ablations`` only).
    """
    unknown = [w for w in ablations if w not in ABLATIONS]
    if unknown or not ablations:
        raise ValueError(f"ablations must be a non-empty subset of {ABLATIONS}, got {ablations}")
    sums: dict[str, list[torch.Tensor]] = {name: [] for name in ("base", *ablations)}
    counts: list[torch.Tensor] = []
    for batch in batches:
        base, count = sequence_losses(model, batch)
        sums["base"].append(base)
        counts.append(count)
        for which in ablations:
            with zeroed_upper_qk(recorder, which):
                sums[which].append(sequence_losses(model, batch)[0])
        n = sum(c.numel() for c in counts)
        if target_se is not None and n >= max(2, min_sequences):
            c = torch.cat(counts)
            ses = [
                ppl_increase_se(torch.cat(sums["base"]), torch.cat(sums[w]), c)[1]
                for w in ablations
            ]
            if all(se < target_se for se in ses):
                break
    if not counts:
        raise ValueError("no held-out batches")
    c = torch.cat(counts)
    base_sums = torch.cat(sums["base"])
    base_loss = float(base_sums.sum()) / float(c.sum())
    out: dict = {
        "base_loss": base_loss,
        "base_ppl": _ppl(base_loss),
        "sequences": c.numel(),
        "tokens": int(c.sum()),
        "target_se": target_se,
    }
    ses = []
    for which in ablations:
        ablated = torch.cat(sums[which])
        loss = float(ablated.sum()) / float(c.sum())
        increase, se = ppl_increase_se(base_sums, ablated, c)
        ses.append(se)
        out[which] = {
            "loss": loss,
            "ppl": _ppl(loss),
            "ppl_increase": increase,
            "ppl_increase_se": se,
        }
    out["target_met"] = None if target_se is None else all(se < target_se for se in ses)
    return out
