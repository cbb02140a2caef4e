"""The immature-channel locality diagnostic of the paper's Appendix I (eq. 69).

For an upper attention layer with input ``X`` (``[n, d]``: the normalised residual stream that
the Q/K projections read) and a projector ``P`` onto the *immature* residual subspace::

    lambda_S = ||X W_S W_S^T P||_F / (||X_P||_F ||W_S||_op^2),   S in {Q, K},  X_P = X P
    R_P / ||X||_F^2 = ||X_P||_F^2 / ||X||_F^2

with ``W_S`` one head's ``[d, d_k]`` projection (torch stores ``W_S^T``, ``[d_k, d]``).

**Estimator of P** (the paper does not say how it estimates it). The theory identifies the
immature residual energy entering upper attention with what the FFNs write into the residual
stream early in training (Section 6: gated FFNs shrink ``R_P`` by shrinking those writes). We
therefore take the immature subspace of upper layer ``l`` to be the dominant directions of the
*lower-half FFN writes as seen by that layer's Q/K input*:

1. ``F`` (``[n, d]``): per token, the sum of the residual writes of all lower-half FFNs
   (``mlp(x) + bias``) on the held-out tokens.
2. ``Y = J_l(F)``: ``F`` mapped through the Jacobian of layer ``l``'s input norm at the
   token's residual ``x`` (a JVP), so ``Y`` lives in the space ``W_S`` reads. With
   ``u = (x - mean(x)) / s`` and ``s = sqrt(var(x) + eps)`` (LayerNorm; RMSNorm: ``u = x / s``,
   ``s = sqrt(mean(x^2) + eps)``, no centring) and ``c(f) = f - mean(f)`` (RMSNorm: ``f``):
   ``J f = gamma * (c(f) - u * mean(u * c(f))) / s``. The radial term matters: FFN writes are
   correlated with the residual they are added to.
3. ``P = V_r V_r^T`` with ``V_r`` the top-``r`` right singular vectors of ``Y`` (``rank``
   parameter, default the head dimension ``d_k``: one head's worth of directions).

Reported per upper layer (heads averaged) and averaged over the upper half. ``lambda`` near 1
means the Q/K form landing in ``P`` is driven by the whole residual stream; small values mean it
is driven by the immature channel itself, the condition of Corollary 2.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from megatron_qk.diagnostics.bilinear import qk_head_weights
from megatron_qk.models.layers import is_upper
from megatron_qk.models.params import bare_model


def _norm_parameters(norm_module, config) -> tuple[torch.Tensor | float, torch.Tensor, float]:
    """``(gamma, beta, eps)`` of a layer's input norm (separate module or fused into linear_qkv)."""
    weight = getattr(norm_module, "weight", None)
    bias = getattr(norm_module, "bias", None)
    if hasattr(norm_module, "layer_norm_weight"):  # Transformer Engine's fused norm + linear
        weight = norm_module.layer_norm_weight
        bias = getattr(norm_module, "layer_norm_bias", None)
    gamma = weight.detach().float() if weight is not None else 1.0
    if config.layernorm_zero_centered_gamma and weight is not None:
        gamma = gamma + 1.0
    beta = bias.detach().float() if bias is not None else torch.zeros(())
    eps = float(getattr(norm_module, "eps", config.layernorm_epsilon))
    return gamma, beta, eps


def _inverse_scale(x: torch.Tensor, rmsnorm: bool, eps: float) -> torch.Tensor:
    if rmsnorm:
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


def _centre(f: torch.Tensor, rmsnorm: bool) -> torch.Tensor:
    return f if rmsnorm else f - f.mean(-1, keepdim=True)


def norm_jvp(
    residual: torch.Tensor, f: torch.Tensor, gamma, eps: float, rmsnorm: bool
) -> torch.Tensor:
    """The input norm's Jacobian at ``residual`` (``[n, d]``) applied to ``f`` (``[n, d]``)."""
    inv = _inverse_scale(residual, rmsnorm, eps)
    u = _centre(residual, rmsnorm) * inv
    cf = _centre(f, rmsnorm)
    return gamma * (cf - u * (u * cf).mean(-1, keepdim=True)) * inv


def _input_norm(layer) -> torch.nn.Module:
    """The module that normalises the attention input (separate, or fused into linear_qkv)."""
    qkv = layer.self_attention.linear_qkv
    if hasattr(qkv, "layer_norm_weight"):
        return qkv
    return layer.input_layernorm


def _top_subspace(y: torch.Tensor, rank: int) -> torch.Tensor:
    """``[d, r]`` orthonormal basis of the top-``rank`` right singular subspace of ``y``."""
    gram = (y.double().T @ y.double()).cpu()
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[:, -rank:].flip(-1).to(y.device)


def _head_lambdas(x: torch.Tensor, w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``lambda`` per head for weights ``w`` ``[heads, d_k, d]`` (eq. 69)."""
    x = x.double()
    w = w.double()
    x_p = x @ basis  # coordinates of X P in the basis: ||X P||_F = ||x_p||_F
    xw = torch.einsum("nd,hkd->hnk", x, w)  # X W_S per head
    wp = torch.einsum("hkd,dr->hkr", w, basis)  # W_S^T P (in the basis)
    num = torch.linalg.matrix_norm(xw @ wp)  # ||X W_S W_S^T P||_F
    op = torch.linalg.matrix_norm(w, ord=2)  # ||W_S||_op
    return num / (torch.linalg.matrix_norm(x_p) * op.pow(2))


@torch.no_grad()
def locality_diagnostic(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    num_layers: int,
    rank: int | None = None,
) -> dict:
    """lambda_Q, lambda_K and R_P/||X||^2 of the upper half on held-out batches (one process).

    Args:
        model: a one-process ``GPTModel`` (TP = PP = 1).
        batches: held-out batches (``tokens``, ``position_ids``).
        num_layers: total layers (upper half: ``layer_number > num_layers / 2``).
        rank: dimension of the estimated immature subspace (default: the head dimension).

    Returns:
        ``{"rank", "lambda_q", "lambda_k", "rp_fraction", "layers": {n: {...}}}``.
    """
    gpt = bare_model(model)
    layers = list(gpt.decoder.layers)
    config = layers[0].self_attention.config
    rank = rank or config.kv_channels
    if not 1 <= rank <= config.hidden_size:
        raise ValueError(f"locality rank must be in [1, {config.hidden_size}], got {rank}")
    upper = [layer for layer in layers if is_upper(layer.layer_number, num_layers)]
    lower = [layer for layer in layers if not is_upper(layer.layer_number, num_layers)]
    captured: dict[str, list] = {"writes": []}
    for layer in upper:
        captured[f"x{layer.layer_number}"] = []
        captured[f"r{layer.layer_number}"] = []
    lower_sum: list[torch.Tensor | None] = [None]

    def lower_hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        bias = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        write = (out if bias is None else out + bias).detach().float()
        lower_sum[0] = write if lower_sum[0] is None else lower_sum[0] + write

    def residual_hook(number):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            captured[f"r{number}"].append(hidden.detach().float().flatten(0, 1))

        return hook

    def input_hook(number):
        def hook(module, args):
            captured[f"x{number}"].append(args[0].detach().float().flatten(0, 1))

        return hook

    handles = [layer.mlp.register_forward_hook(lower_hook) for layer in lower]
    for layer in upper:
        n = int(layer.layer_number)
        handles.append(layer.register_forward_pre_hook(residual_hook(n), with_kwargs=True))
        qkv = layer.self_attention.linear_qkv
        handles.append(qkv.register_forward_pre_hook(input_hook(n)))
    try:
        for batch in batches:
            lower_sum[0] = None
            gpt(batch["tokens"], batch["position_ids"], attention_mask=None)
            if lower_sum[0] is None:
                raise RuntimeError("no lower-half FFN write was captured")
            captured["writes"].append(lower_sum[0].flatten(0, 1))
    finally:
        for handle in handles:
            handle.remove()

    writes = torch.cat(captured["writes"])
    rmsnorm = config.normalization == "RMSNorm"
    per_layer: dict[str, dict] = {}
    for layer in upper:
        n = int(layer.layer_number)
        residual = torch.cat(captured[f"r{n}"])
        gamma, beta, eps = _norm_parameters(_input_norm(layer), config)
        inv = _inverse_scale(residual, rmsnorm, eps)
        x = torch.cat(captured[f"x{n}"])
        if hasattr(layer.self_attention.linear_qkv, "layer_norm_weight"):
            # Transformer Engine fuses the input norm into linear_qkv, whose input is the raw
            # residual: apply the norm here to get what W_Q / W_K read.
            x = gamma * _centre(residual, rmsnorm) * inv + beta.to(residual.device)
        # The lower FFN writes as the norm's Jacobian at this token's residual maps them.
        basis = _top_subspace(norm_jvp(residual, writes, gamma, eps, rmsnorm), rank)
        wq, wk = qk_head_weights(layer.self_attention)
        x_p = x.double() @ basis
        per_layer[str(n)] = {
            "lambda_q": _head_lambdas(x, wq.detach(), basis).mean().item(),
            "lambda_k": _head_lambdas(x, wk.detach(), basis).mean().item(),
            "rp_fraction": (x_p.pow(2).sum() / x.double().pow(2).sum()).item(),
        }

    def mean(key: str) -> float:
        return sum(v[key] for v in per_layer.values()) / len(per_layer)

    return {
        "rank": rank,
        "estimator": "top singular subspace of lower-half FFN writes through the input norm's JVP",
        "lambda_q": mean("lambda_q"),
        "lambda_k": mean("lambda_k"),
        "rp_fraction": mean("rp_fraction"),
        "layers": per_layer,
    }
