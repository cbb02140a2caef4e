"""Attention probes as pure functions of one layer's post-RoPE Q/K and the input tokens.

Shapes follow Megatron's core attention: ``query [s, b, np, hn]``, ``key [s, b, ng, hn]`` with
``np`` a multiple of ``ng`` (GQA), tokens ``[b, s]``. The attention pattern is recomputed from Q
and K (causal softmax with the layer's softmax scale), so the probes work whatever kernel the
model itself uses (local, flash, Transformer Engine).

Definitions (the paper's, made precise):

* **copy mass** (lower-copy score when averaged over the lower half): at each query position
  ``i`` whose token occurred before, the attention probability on the *nearest* previous
  occurrence ``j = max{j < i : t_j = t_i}``; averaged over heads and such positions.
* **entropy**: row entropy of the causal attention distribution divided by ``log(i + 1)`` (the
  log of the number of keys the row can see), so it lies in [0, 1]; row 0 (one key) is skipped.
* **logit magnitude**: root mean square of the scaled pre-softmax logits ``q·k * scale`` over
  causal (query, key) pairs.

Each probe returns per-head *sums and counts* so that ranks holding different heads (TP),
layers (PP) or sequences (DP) combine exactly by an all-reduce.
"""

from __future__ import annotations

import torch

#: Order of the statistics in :func:`layer_statistics`' output.
STATS = ("copy", "entropy", "logit", "logit_abs")


def previous_occurrence(tokens: torch.Tensor) -> torch.Tensor:
    """Index of the nearest previous occurrence of each token, ``-1`` where there is none.

    Args:
        tokens: ``[b, s]`` integer tokens.

    Returns:
        ``[b, s]`` long tensor.
    """
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device)
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, i, j]
    earlier = pos[None, :, None] > pos[None, None, :]
    candidates = torch.where(same & earlier, pos[None, None, :], torch.full_like(pos, -1))
    return candidates.max(dim=-1).values


def _expand_groups(key: torch.Tensor, num_heads: int) -> torch.Tensor:
    groups = key.shape[2]
    if groups == num_heads:
        return key
    return key.repeat_interleave(num_heads // groups, dim=2)


def _causal_rows(
    q: torch.Tensor, k: torch.Tensor, scale: float, rows: slice, offset: int = 0
) -> torch.Tensor:
    """Scaled logits ``[b, h, r, s]`` of query rows ``rows`` with future keys at -inf.

    ``offset``: the sequence position of ``q``'s first row (when ``q`` is already a row chunk).
    """
    logits = torch.einsum("rbhd,sbhd->bhrs", q[rows].float(), k.float()) * scale
    r_idx = torch.arange(rows.start + offset, rows.stop + offset, device=q.device)[:, None]
    k_idx = torch.arange(k.shape[0], device=q.device)[None, :]
    return logits.masked_fill(k_idx > r_idx, float("-inf"))


@torch.no_grad()
def layer_statistics(
    query: torch.Tensor,
    key: torch.Tensor,
    tokens: torch.Tensor,
    scale: float,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Per-head sums and counts of copy mass, normalised entropy and logit RMS for one layer.

    Args:
        query: ``[s, b, np, hn]`` post-RoPE queries (this rank's heads).
        key: ``[s, b, ng, hn]`` post-RoPE keys.
        tokens: ``[b, s]`` input tokens of the same micro-batch.
        scale: the layer's softmax scale (``1/sqrt(hn)`` unless configured).
        chunk_size: query rows per chunk (bounds memory at ``b*np*chunk*s`` floats).

    Returns:
        float64 ``[np, len(STATS), 2]``: per head, rows :data:`STATS`, columns (sum, count).
        The ``logit`` row sums squared logits (take the square root of the mean: the RMS), the
        ``logit_abs`` row their absolute values (the mean |z|).
    """
    s, _, heads, _ = query.shape
    key = _expand_groups(key, heads)
    prev = previous_occurrence(tokens)  # [b, s]
    out = torch.zeros(heads, len(STATS), 2, dtype=torch.float64, device=query.device)
    for start in range(0, s, chunk_size):
        rows = slice(start, min(s, start + chunk_size))
        logits = _causal_rows(query, key, scale, rows)  # [b, h, r, s]
        probs = torch.softmax(logits, dim=-1)
        r_idx = torch.arange(rows.start, rows.stop, device=query.device)
        # Copy mass on the nearest previous occurrence.
        p = prev[:, rows]  # [b, r]
        valid = p >= 0
        gathered = probs.gather(-1, p.clamp(min=0)[:, None, :, None].expand(-1, heads, -1, 1))
        mass = gathered.squeeze(-1) * valid[:, None, :]  # [b, h, r]
        out[:, 0, 0] += mass.sum(dim=(0, 2)).double()
        out[:, 0, 1] += valid.sum().double()
        # Normalised entropy, rows with at least two keys.
        plogp = torch.where(probs > 0, probs * torch.log(probs), torch.zeros_like(probs))
        ent = -plogp.sum(-1)  # [b, h, r]
        norm = torch.log((r_idx + 1).double()).float()
        use = r_idx >= 1
        out[:, 1, 0] += (ent[..., use] / norm[use]).sum(dim=(0, 2)).double()
        out[:, 1, 1] += float(ent.shape[0] * int(use.sum()))
        # Logit RMS over causal pairs.
        finite = torch.isfinite(logits)
        kept = torch.where(finite, logits, torch.zeros_like(logits))
        pairs = finite.sum(dim=(0, 2, 3)).double()
        out[:, 2, 0] += kept.pow(2).sum(dim=(0, 2, 3)).double()
        out[:, 2, 1] += pairs
        # Mean |z| beside the RMS: the RMS weighs the few large logits of a sharp head most,
        # the mean |z| the bulk (docs/REPRODUCTION.md, Table 10's logit column).
        out[:, 3, 0] += kept.abs().sum(dim=(0, 2, 3)).double()
        out[:, 3, 1] += pairs
    return out


def _rows_entropy_sum(q_rows: torch.Tensor, key: torch.Tensor, scale: float, start: int):
    """Sum over query rows ``start .. start + r`` (rows >= 1) of the normalised row entropy."""
    r = q_rows.shape[0]
    logits = _causal_rows(q_rows, key, scale, slice(0, r), offset=start)
    logp = torch.log_softmax(logits, dim=-1)
    # Masked keys have logp = -inf; zero them *before* multiplying so no 0 * inf reaches the
    # backward pass (torch.where after the product would still propagate NaN gradients).
    causal = torch.isfinite(logp)
    logp = torch.where(causal, logp, torch.zeros_like(logp))
    probs = logp.exp() * causal
    ent = -(probs * logp).sum(-1)  # [b, h, r]
    rows = torch.arange(start, start + r, device=q_rows.device)
    use = rows >= 1
    norm = torch.log((rows[use] + 1).float())
    return (ent[..., use] / norm).sum()


def normalized_entropy_sum(
    query: torch.Tensor, key: torch.Tensor, scale: float, chunk_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """Differentiable sum of normalised row entropies (rows >= 1) and the row count.

    Used by the entropy floor on the training batch; gradients flow to ``query`` and ``key``.
    The attention is computed ``chunk_size`` query rows at a time under activation
    checkpointing: the forward keeps no attention matrix for the backward, which recomputes one
    chunk at a time. Memory is then ``b x heads x chunk x s`` floats per chunk instead of the
    full ``b x heads x s x s`` attention (and its softmax intermediates) held from forward to
    backward for every upper layer. None: one chunk, no recomputation.
    """
    from torch.utils.checkpoint import checkpoint

    s, b, heads, _ = query.shape
    key = _expand_groups(key, heads)
    if chunk_size is None or chunk_size >= s:
        return _rows_entropy_sum(query, key, scale, 0), b * heads * (s - 1)
    total = query.new_zeros((), dtype=torch.float32)
    for start in range(0, s, chunk_size):
        q_rows = query[start : start + chunk_size]
        total = total + checkpoint(
            _rows_entropy_sum, q_rows, key, scale, start, use_reentrant=False
        )
    return total, b * heads * (s - 1)


def uniform_copy_sum(tokens: torch.Tensor) -> tuple[float, int]:
    """Copy mass that *uniform* causal attention puts on the nearest previous occurrence.

    The baseline of the copy mass on the same positions: a query at position ``i`` (0-based)
    whose token occurred before sees keys ``0 .. i``, so uniform attention gives its nearest
    previous occurrence ``1 / (i + 1)``. It depends only on the tokens, so every head and layer
    shares it, and its mean over the counted positions is directly comparable with the copy
    score: a ratio above 1 means attention prefers the previous occurrence over chance.

    Args:
        tokens: ``[b, s]`` integer tokens.

    Returns:
        ``(sum of 1 / (i + 1) over positions with a previous occurrence, their count)``.
    """
    prev = previous_occurrence(tokens)
    valid = prev >= 0
    weight = 1.0 / torch.arange(1, tokens.shape[1] + 1, device=tokens.device, dtype=torch.float64)
    return float((weight[None, :] * valid).sum()), int(valid.sum())
