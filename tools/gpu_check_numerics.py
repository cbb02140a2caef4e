"""Numerics of ``tools/gpu_check.py``'s TE-vs-local check: can it see a wrong weight mapping?

The check copies one model's weights into another by canonical checkpoint key and compares what
the two compute. At initialisation that comparison is blind: norms are all ones, biases zero and
every residual branch small, so a model with W_Q and W_K swapped and ``fc2`` negated moves the
mean loss by ~2e-3 relative, like unrelated weights. So here:

* the source's weights are first moved away from their initialisation
  (:func:`perturb_canonical`), then copied;
* the comparison is per layer (every ``TransformerLayer``'s output hidden states) and on the
  logits, as a relative Frobenius-norm difference (:func:`relative_differences`);
* the tolerance is derived from TF32 rounding, measured on the same model and batch: Transformer
  Engine runs fp32 GEMMs as TF32 (10 explicit mantissa bits), so TE against torch's fp32 differs
  by about what TF32 rounding alone does to the local model. :func:`tf32_spread` measures that
  (the local model with and without torch's TF32 matmuls); the tolerance is
  ``TF32_MARGIN x spread`` plus an fp32 floor (:func:`tolerances`). On a CPU there is no TF32:
  the spread is 0 and the two sides must agree to the floor;
* the negative control (:func:`wrong_mapping`: W_Q and W_K swapped, ``fc2`` negated) must fail
  the same comparison, or the check itself is reported broken.
"""

from __future__ import annotations

import contextlib

import torch

#: fp32 unit roundoff (2^-24): the floor for kernels that differ only in accumulation order.
FP32_UNIT_ROUNDOFF = 2.0**-24
#: TF32 keeps 10 explicit mantissa bits: unit roundoff 2^-11.
TF32_UNIT_ROUNDOFF = 2.0**-11
#: TE (TF32) and local (fp32) are each one TF32 rounding of the same GEMMs apart at most: by
#: the triangle inequality their difference is below twice the measured spread; 4x that leaves
#: room for TE's different accumulation order and fused norm kernels. A wrong mapping moves the
#: hidden states by O(1) relative, orders of magnitude above this.
TF32_MARGIN = 8.0
#: Relative fp32 floor per layer: accumulation order over sums of up to ~10^4 terms.
FP32_FLOOR = 1e4 * FP32_UNIT_ROUNDOFF


def _canonical(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from megatron_qk.models.checkpoint_layout import canonical_tensors
    from megatron_qk.models.params import bare_model

    return canonical_tensors(bare_model(model))


@torch.no_grad()
def perturb_canonical(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> int:
    """Move every weight away from its initialisation, deterministically by canonical key.

    Each tensor gets Gaussian noise of ``scale`` times its own spread (at least 0.1 for
    constant tensors such as norm weights of ones and zero biases), so norms, biases and every
    residual branch take part in the output. Returns the number of tensors moved.
    """
    tensors = _canonical(model)
    for i, key in enumerate(sorted(tensors)):
        t = tensors[key]
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        spread = float(t.float().std()) if t.numel() > 1 else 0.0
        noise = torch.randn(t.shape, generator=g) * scale * max(spread, 0.1)
        t.add_(noise.to(device=t.device, dtype=t.dtype))
    return len(tensors)


@torch.no_grad()
def wrong_mapping(model: torch.nn.Module) -> int:
    """The negative control: swap W_Q and W_K (their common rows under GQA) and negate ``fc2``.

    Returns the number of tensors changed (so a caller can check the control did something).
    """
    tensors = _canonical(model)
    changed = 0
    for key, t in tensors.items():
        if key.endswith("linear_qkv.linear_q.weight"):
            k = tensors[key.replace("linear_q.weight", "linear_k.weight")]
            rows = min(t.shape[0], k.shape[0])
            q_rows = t[:rows].clone()
            t[:rows].copy_(k[:rows])
            k[:rows].copy_(q_rows)
            changed += 2
        elif key.endswith("mlp.linear_fc2.weight"):
            t.neg_()
            changed += 1
    return changed


@torch.no_grad()
def layer_outputs(model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each transformer layer's output hidden states, then the logits, in fp32 on the CPU."""
    from megatron_qk.models.params import bare_model

    bare = bare_model(model)
    outs: list[torch.Tensor] = []

    def keep(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        outs.append(hidden.detach().float().cpu())

    hooks = [layer.register_forward_hook(keep) for layer in bare.decoder.layers]
    try:
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        logits = model(tokens, pos, attention_mask=None)
    finally:
        for h in hooks:
            h.remove()
    return [*outs, logits.detach().float().cpu()]


def relative_differences(want: list[torch.Tensor], got: list[torch.Tensor]) -> list[float]:
    """``||got - want|| / ||want||`` per layer output (and the logits, last)."""
    assert len(want) == len(got), (len(want), len(got))
    return [float((g - w).norm() / w.norm().clamp_min(1e-30)) for w, g in zip(want, got)]


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool):
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def tf32_spread(model: torch.nn.Module, tokens: torch.Tensor) -> list[float]:
    """What TF32 rounding alone does to ``model`` on ``tokens``: per-layer relative differences
    between its fp32 and its TF32-matmul outputs (all zeros off CUDA, where there is no TF32)."""
    with _tf32_matmuls(False):
        exact = layer_outputs(model, tokens)
    if tokens.device.type != "cuda":
        return [0.0] * len(exact)
    with _tf32_matmuls(True):
        rounded = layer_outputs(model, tokens)
    return relative_differences(exact, rounded)


def tolerances(spread: list[float]) -> list[float]:
    """Per-output tolerance: ``TF32_MARGIN x`` the measured TF32 spread, plus the fp32 floor."""
    return [TF32_MARGIN * s + FP32_FLOOR for s in spread]


def compare(
    reference: torch.nn.Module, candidate: torch.nn.Module, tokens: torch.Tensor
) -> dict[str, object]:
    """Compare ``candidate`` (e.g. TE) against ``reference`` (local, fp32) on ``tokens``.

    Returns:
        ``rel_diff`` and ``tolerance`` per output (layers, then logits), ``worst_ratio`` (the
        largest difference / tolerance) and ``ok`` (every difference within its tolerance).
    """
    spread = tf32_spread(reference, tokens)
    tol = tolerances(spread)
    with _tf32_matmuls(False):
        want = layer_outputs(reference, tokens)
        got = layer_outputs(candidate, tokens)
    diffs = relative_differences(want, got)
    worst = max(d / t for d, t in zip(diffs, tol, strict=True))
    return {
        "rel_diff": [float(f"{d:.3g}") for d in diffs],
        "tf32_spread": [float(f"{s:.3g}") for s in spread],
        "tolerance": [float(f"{t:.3g}") for t in tol],
        "worst_ratio": float(f"{worst:.3g}"),
        "ok": worst <= 1.0,
    }
