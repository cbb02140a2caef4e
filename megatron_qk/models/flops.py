"""Model FLOPs per token and MFU, with Megatron-LM's ``num_floating_point_operations`` formula.

For a dense decoder (no MoE, no MLA, no multi-token prediction) Megatron-LM counts, per token
and per training step (forward 1x + backward 2x, so a factor 3, and 2 FLOPs per multiply-add):

    per layer   6 * h * (q + 2*kv + q)      Q, K, V and output projections
              + 6 * s * q                   causal attention: Q K^T and A V, half the matrix
              + 6 * m * h * f               FFN, m = 3 matrices if gated (SwiGLU/GEGLU) else 2
    once      + 6 * h * V                   output layer (logits), V = padded vocabulary

with h the hidden size, q = heads * head_dim, kv = query_groups * head_dim (GQA), s the
sequence length and f the FFN width. Norms, biases, activations, softmax and the embedding
lookup are left out, as Megatron-LM leaves them out. MFU is the achieved model FLOP rate per GPU
divided by the GPU's dense bf16 peak (``logging.peak_tflops_per_gpu``). docs/THROUGHPUT.md has
the worked 270M example.
"""

from __future__ import annotations

from megatron_qk.config.model import ModelConfig

#: NVIDIA H100 SXM / H200 SXM dense BF16 tensor-core peak (no sparsity), TFLOP/s.
H100_BF16_DENSE_TFLOPS = 989.0

#: Dense BF16 tensor-core peak per GPU in TFLOP/s by a marker in ``torch.cuda.get_device_name()``,
#: most specific first: NVIDIA's datasheet figures "with sparsity" halved (H100 SXM and H200
#: 1979 -> 989, H100 PCIe 1513 -> 756, H100 NVL and H200 NVL 1671 -> 835). The SXM parts report
#: no form factor ("NVIDIA H100 80GB HBM3", "NVIDIA H200"), so they match the bare name.
PEAK_BF16_TFLOPS_BY_NAME: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", H100_BF16_DENSE_TFLOPS),
    ("H200", H100_BF16_DENSE_TFLOPS),
)


def peak_bf16_tflops(device_name: str) -> tuple[float, bool]:
    """Dense bf16 peak of the GPU called ``device_name`` and whether the name was recognised.

    An unknown device falls back to the H100 SXM figure (989) with ``False``, so a caller can
    say that its MFU is relative to that figure rather than to the device's own peak.
    """
    for marker, tflops in PEAK_BF16_TFLOPS_BY_NAME:
        if marker.lower() in device_name.lower():
            return tflops, True
    return H100_BF16_DENSE_TFLOPS, False


def flops_per_token(model: ModelConfig, padded_vocab_size: int) -> int:
    """Training FLOPs (forward + backward) per token of ``model``."""
    h, s, f = model.hidden_size, model.seq_length, model.ffn_hidden_size
    heads = model.num_attention_heads
    groups = model.query_groups
    head_dim = model.head_dim
    q, kv = heads * head_dim, groups * head_dim
    ffn_matrices = 3 if model.ffn in ("swiglu", "geglu") else 2
    per_layer = 6 * h * (2 * q + 2 * kv) + 6 * s * q + 6 * ffn_matrices * h * f
    return model.num_layers * per_layer + 6 * h * padded_vocab_size


def throughput_fields(
    tokens: int,
    seconds: float,
    flops_token: int,
    num_gpus: int,
    peak_tflops_per_gpu: float,
) -> dict[str, float]:
    """tokens/s, model TFLOP/s per GPU and MFU for ``tokens`` processed in ``seconds``.

    Args:
        tokens: tokens of the step (global batch x sequence length).
        seconds: wall time of the step.
        flops_token: :func:`flops_per_token`.
        num_gpus: processes sharing the work (world size).
        peak_tflops_per_gpu: the device's dense bf16 peak.
    """
    tokens_per_second = tokens / seconds
    tflops_per_gpu = flops_token * tokens_per_second / num_gpus / 1e12
    return {
        "tokens_per_second": tokens_per_second,
        "tflops_per_gpu": tflops_per_gpu,
        "mfu": tflops_per_gpu / peak_tflops_per_gpu,
    }
