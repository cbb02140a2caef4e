"""The per-head Q/K bilinear form ``W_Q^T W_K`` of the paper: top singular value and displacement.

For query head ``h`` with key group ``g`` Megatron computes ``q_h = W_q^h x`` and ``k_g = W_k^g y``
with ``W_q^h, W_k^g`` of shape ``[hn, d]`` (torch's ``[out, in]``), so the pre-softmax logit is the
bilinear form ``x^T B_h y`` with ``B_h = (W_q^h)^T W_k^g`` (``[d, d]``, rank <= hn). This is the
paper's ``W_Q^T W_K`` (Figure 3C, Table 10). RoPE rotates q and k by position and the softmax
scale multiplies the logit; both are left out, so ``B_h`` is a property of the weights alone.

* **top singular value** ``sigma_1(B_h)``.
* **displacement from initialisation** ``||B_h - B_h^(0)||_2`` (spectral norm), where ``B_h^(0)``
  is the same head's form at initialisation (Table 10's "Q/K bilinear displacement").

Both are computed without forming the ``d x d`` matrix: for ``B = A^T C`` with thin factors
``A, C`` (``[r, d]``), QR-factorising ``A^T = Q_a R_a`` and ``C^T = Q_c R_c`` gives
``B = Q_a (R_a R_c^T) Q_c^T`` with orthonormal ``Q_a, Q_c``, so ``sigma(B) = sigma(R_a R_c^T)``,
an ``r x r`` problem. The displacement uses ``B - B0 = [A; -A0]^T [C; C0]`` (``r = 2 hn``).

*With QK-norm* (``model.qk_layernorm``) attention does not see ``W_q x`` but its per-head norm
``gamma_q * n(W_q x) (+ beta_q)``: the norm removes the scale of ``W_q``, so ``W_Q^T W_K`` no
longer sets the logits. The form the logit applies to the normalised query and key (unit RMS,
``hn``-vectors) is ``diag(gamma_q) diag(gamma_k)``, and :func:`qk_logit_factors` returns those
factors (``[hn, hn]`` per head) in place of the weights, so the same two statistics measure the
post-norm form attention uses: ``sigma_1 = max_i |gamma_q,i gamma_k,i|`` and its displacement.
LayerNorm's ``beta`` (an additive offset of every query/key) is left out, as RoPE is.
"""

from __future__ import annotations

import torch


def qk_head_weights(attention: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's query and key projection weights of one ``SelfAttention``, per head.

    Args:
        attention: a layer's ``self_attention`` (split Q/K/V or Megatron's fused ``linear_qkv``).

    Returns:
        ``(wq [np, hn, d], wk [ng, hn, d])`` for this rank's heads and groups (views, no copy
        for the split projection).
    """
    from megatron_qk.models.split_qkv import fused_qkv_to_split

    qkv = attention.linear_qkv
    cfg = attention.config
    hn = cfg.kv_channels
    if hasattr(qkv, "linear_q"):
        wq, wk = qkv.linear_q.weight, qkv.linear_k.weight
    else:
        np_local = attention.num_attention_heads_per_partition
        ng_local = attention.num_query_groups_per_partition
        wq, wk, _ = fused_qkv_to_split(qkv.weight, np_local, ng_local, hn)
    d = wq.shape[-1]
    return wq.reshape(-1, hn, d), wk.reshape(-1, hn, d)


def _norm_gain(norm: torch.nn.Module | None) -> torch.Tensor | None:
    """The elementwise gain of a QK-norm module, None where there is none (Megatron's
    ``IdentityOp`` or no module)."""
    weight = getattr(norm, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def qk_logit_factors(attention: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors ``(A [np, r, d], C [ng, r, d])`` of the per-head logit form ``A^T C``.

    Without QK-norm, the projection weights (:func:`qk_head_weights`). With QK-norm,
    ``diag(gamma_q)`` per query head and ``diag(gamma_k)`` per key group (``[hn, hn]``; the
    module docstring says why).
    """
    gain_q = _norm_gain(getattr(attention, "q_layernorm", None))
    gain_k = _norm_gain(getattr(attention, "k_layernorm", None))
    if gain_q is None or gain_k is None:
        return qk_head_weights(attention)
    heads = attention.num_attention_heads_per_partition
    groups = attention.num_query_groups_per_partition
    dq, dk = torch.diag(gain_q.detach()), torch.diag(gain_k.detach())
    return dq.expand(heads, -1, -1), dk.expand(groups, -1, -1)


def _spectral_norm_of_product(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``||A^T C||_2`` for batches of thin factors ``a, c`` of shape ``[n, r, d]`` (``r <= d``)."""
    _, ra = torch.linalg.qr(a.transpose(1, 2).double())  # [n, r, r]
    _, rc = torch.linalg.qr(c.transpose(1, 2).double())
    return torch.linalg.matrix_norm(ra @ rc.transpose(1, 2), ord=2)


def _expand_groups(wk: torch.Tensor, heads: int) -> torch.Tensor:
    groups = wk.shape[0]
    return wk if groups == heads else wk.repeat_interleave(heads // groups, dim=0)


@torch.no_grad()
def bilinear_top_singular_value(wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """``sigma_1((W_q^h)^T W_k^g)`` per query head.

    Args:
        wq: ``[np, hn, d]`` query weights per head.
        wk: ``[ng, hn, d]`` key weights per group (``np`` a multiple of ``ng``).

    Returns:
        float64 ``[np]``.
    """
    return _spectral_norm_of_product(wq, _expand_groups(wk, wq.shape[0]))


@torch.no_grad()
def bilinear_displacement(
    wq: torch.Tensor, wk: torch.Tensor, wq0: torch.Tensor, wk0: torch.Tensor
) -> torch.Tensor:
    """``||(W_q^h)^T W_k^g - (W_q0^h)^T W_k0^g||_2`` per query head (spectral norm).

    Args:
        wq, wk: current weights (see :func:`bilinear_top_singular_value`).
        wq0, wk0: the same tensors at initialisation.

    Returns:
        float64 ``[np]``.
    """
    heads = wq.shape[0]
    a = torch.cat([wq.to(wq0.dtype), -wq0], dim=1)
    c = torch.cat([_expand_groups(wk, heads).to(wk0.dtype), _expand_groups(wk0, heads)], dim=1)
    return _spectral_norm_of_product(a, c)
