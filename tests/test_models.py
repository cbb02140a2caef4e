"""Model variants: build, forward/backward, parameter counts, the split Q/K/V projection."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from fp32_bounds import U, gamma, matmul_bound
from small_model import SMALL

from megatron_qk.config.loader import load_config
from megatron_qk.models.builder import build_gpt_model, padded_vocab_size
from megatron_qk.models.params import (
    annotate_param_roles,
    count_parameters,
    expected_parameter_count,
)
from megatron_qk.models.split_qkv import fused_qkv_to_split, split_qkv_to_fused


def _cfg(*overrides: str):
    return load_config("tiny", list(SMALL) + list(overrides))


def _tokens(cfg, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.seq_length), generator=g)
    position_ids = torch.arange(cfg.model.seq_length).expand(batch, -1)
    return tokens, position_ids


def _logits(model, cfg, seed: int = 0) -> torch.Tensor:
    tokens, pos = _tokens(cfg, seed=seed)
    return model(tokens, pos, attention_mask=None)


VARIANTS = list(itertools.product(("gelu", "swiglu", "geglu"), ("layernorm", "rmsnorm"), (1, 0)))


@pytest.mark.parametrize(("ffn", "norm", "bias"), VARIANTS, ids=lambda v: str(v))
def test_every_variant_builds_runs_backward_and_counts(single_rank, ffn, norm, bias):
    cfg = _cfg(f"model.ffn={ffn}", f"model.normalization={norm}", f"model.bias={bool(bias)}")
    model = build_gpt_model(cfg, init_seed=3)
    tokens, pos = _tokens(cfg)
    labels, _ = _tokens(cfg, seed=1)
    loss = model(tokens, pos, attention_mask=None, labels=labels).mean()
    assert math.isfinite(loss.item())
    # Random init, labels independent of the inputs, 104-way vocabulary: loss near ln(104).
    assert abs(loss.item() - math.log(padded_vocab_size(cfg))) < 0.5
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    has_bias = any(n.endswith(".bias") and "norm" not in n for n, _ in model.named_parameters())
    assert has_bias == bool(bias)
    has_norm_bias = any("norm" in n and n.endswith(".bias") for n, _ in model.named_parameters())
    assert has_norm_bias == (norm == "layernorm")
    fc1 = model.decoder.layers[0].mlp.linear_fc1.weight
    assert fc1.shape[0] == (2 if ffn != "gelu" else 1) * 48
    assert count_parameters(model)["total"] == expected_parameter_count(
        cfg.model, padded_vocab_size(cfg)
    )


def test_tiny_preset_count_by_hand(single_rank):
    """The tiny preset counted by hand (vocab 50257 padded to 50304, h=64, ffn 256, 4 layers)."""
    cfg = load_config("tiny")
    embedding = 50304 * 64
    attention = 64 * 3 * 64 + 3 * 64 + 64 * 64 + 64
    mlp = 64 * 256 + 256 + 256 * 64 + 64
    per_layer = attention + mlp + 2 * (2 * 64)
    expected = embedding + 4 * per_layer + 2 * 64
    assert expected == 3_419_520
    assert count_parameters(build_gpt_model(cfg))["total"] == expected


@pytest.mark.parametrize("ffn", ["geglu", "swiglu"])
def test_gated_ffn_uses_the_exact_activation(single_rank, ffn):
    """GEGLU is gated *exact* (erf) GELU, not the tanh/quick approximation; SwiGLU is SiLU."""
    cfg = _cfg(f"model.ffn={ffn}", "model.bias=false")
    mlp = build_gpt_model(cfg, init_seed=1).decoder.layers[0].mlp
    # Scaled so the pre-activations spread over a few units, where erf and tanh GELU differ.
    x = 40 * torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(0))
    out, _ = mlp(x)
    a, b = (x @ mlp.linear_fc1.weight.t()).chunk(2, dim=-1)
    if ffn == "geglu":
        act = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
        approx = torch.nn.functional.gelu(a, approximate="tanh")
        # The exact/approximate gap on these inputs is far above fp32 noise.
        assert (act - approx).abs().max() > 1e-4
    else:
        act = a * torch.sigmoid(a)
    expected = (act * b) @ mlp.linear_fc2.weight.t()
    # Bound derived from fp32 rounding (tests/fp32_bounds.py): both sides compute a, b as dot
    # products of length hidden (error <= gamma(h)|x||W1| each, so 2x between them), the
    # activation (|act'| <= 1.13 for GELU and SiLU, plus a few ulps for erf/sigmoid), the product,
    # and the fc2 dot products of length ffn (2 gamma(f) |act b||W2|).
    w1, w2 = mlp.linear_fc1.weight.t(), mlp.linear_fc2.weight.t()
    da, db = (2 * matmul_bound(x, w) for w in w1.chunk(2, dim=-1))
    dact = 1.13 * da + 8 * U * act.double().abs()
    dprod = dact * b.double().abs() + act.double().abs() * db + 2 * U * (act * b).double().abs()
    bound = 2 * matmul_bound(act * b, w2) + dprod @ w2.double().abs()
    assert ((out.double() - expected.double()).abs() <= bound).all()
    if ffn == "geglu":  # and the bound is tight enough to tell the tanh approximation apart
        tanh_out = (approx * b) @ w2
        assert ((out.double() - tanh_out.double()).abs() > bound).any()


@pytest.mark.parametrize("path", ["one-gemm", "three-gemms"])
@pytest.mark.parametrize(("groups", "bias"), [(4, True), (4, False), (2, True), (1, False)])
def test_split_qkv_equals_stock_fused_on_the_same_weights(single_rank, groups, bias, path):
    """Our split projection computes the same function as stock Megatron's fused linear_qkv.

    The local spec runs one GEMM on the re-interleaved weight (bit-identical to stock); the
    Transformer Engine variant runs three GEMMs and concatenates (equal to rounding).
    """
    overrides = (f"model.num_query_groups={groups}", f"model.bias={bias}")
    stock_cfg = _cfg(*overrides, "model.split_qkv=false")
    split_cfg = _cfg(*overrides)
    stock = build_gpt_model(stock_cfg, init_seed=7)
    split = build_gpt_model(split_cfg, init_seed=11)
    hn = stock_cfg.model.head_dim
    split_state = split.state_dict()
    for key, value in stock.state_dict().items():
        if "linear_qkv.weight" in key or "linear_qkv.bias" in key:
            q, k, v = fused_qkv_to_split(value, 4, groups, hn)
            kind = key.rsplit(".", 1)[1]
            prefix = key.rsplit(".", 1)[0]
            for part, tensor in zip("qkv", (q, k, v)):
                split_state[f"{prefix}.linear_{part}.{kind}"] = tensor
            torch.testing.assert_close(split_qkv_to_fused(q, k, v, 4, groups, hn), value)
        elif key in split_state:
            split_state[key] = value
    assert not torch.allclose(_logits(split, split_cfg), _logits(stock, stock_cfg))
    split.load_state_dict(split_state)
    if path == "three-gemms":
        for layer in split.decoder.layers:
            layer.self_attention.linear_qkv.fused_runner = None
        # Three GEMMs vs one reorder each Q/K/V dot product of length hidden=32: at most
        # 2 gamma(32) ~ 4e-6 relative per projection (fp32_bounds); each of the 2 layers adds
        # its own, carried by softmax/LayerNorm (Lipschitz ~1 on these O(1) activations) to the
        # O(1) logits: 2 x 2 gamma(32) relative, and as absolute bound on O(1) values.
        tol = dict(rtol=4 * gamma(32), atol=4 * gamma(32))
    else:
        assert split.decoder.layers[0].self_attention.linear_qkv.fused_runner is not None
        tol = dict(rtol=0, atol=0)
    torch.testing.assert_close(_logits(split, split_cfg), _logits(stock, stock_cfg), **tol)
    # Gradients reach W_Q, W_K, W_V as the de-interleaved fused gradient.
    for model in (stock, split):
        (_logits(model, stock_cfg) ** 2).mean().backward()
    fused_grad = stock.decoder.layers[1].self_attention.linear_qkv.weight.grad
    parts = split.decoder.layers[1].self_attention.linear_qkv
    expected = fused_qkv_to_split(fused_grad, 4, groups, hn)
    for got, want in zip((parts.linear_q, parts.linear_k, parts.linear_v), expected):
        # Weight gradients are dot products over the b*s = 32 tokens of dY and X, summed in
        # another order by the two paths: 2 gamma(32) relative to sum|dY||X|; atol 1e-7 covers
        # entries that cancel towards 0, where that sum is larger than the entry itself.
        torch.testing.assert_close(got.weight.grad, want, rtol=2 * gamma(32), atol=1e-7)


def test_param_roles_and_layer_numbers(single_rank):
    cfg = _cfg("model.num_layers=3")
    model = build_gpt_model(cfg)
    roles = annotate_param_roles(model)
    for layer in (1, 2, 3):
        idx = layer - 1
        assert roles[f"decoder.layers.{idx}.self_attention.linear_qkv.linear_q.weight"] == (
            layer,
            "q",
        )
        assert roles[f"decoder.layers.{idx}.self_attention.linear_qkv.linear_k.weight"] == (
            layer,
            "k",
        )
        assert roles[f"decoder.layers.{idx}.self_attention.linear_qkv.linear_v.weight"] == (
            layer,
            "v",
        )
        assert roles[f"decoder.layers.{idx}.self_attention.linear_proj.weight"] == (layer, "o")
        assert roles[f"decoder.layers.{idx}.mlp.linear_fc1.weight"] == (layer, "fc1")
    assert roles["embedding.word_embeddings.weight"] == (None, "embedding")
    assert roles["decoder.final_layernorm.weight"] == (None, "final_norm")
    q = model.decoder.layers[2].self_attention.linear_qkv.linear_q.weight
    assert (q.mqk_layer_number, q.mqk_role) == (3, "q")
    assert set(r for _, r in roles.values()) <= {
        "q",
        "k",
        "v",
        "o",
        "fc1",
        "fc2",
        "norm",
        "embedding",
        "final_norm",
    }


def test_layer_seeded_init_is_independent_of_earlier_draws(single_rank):
    """A layer's initial weights depend on the seed and its layer number only.

    This is what makes a PP=2 stage holding layers 3-4 start from the same weights as layers
    3-4 of a one-stage model, whatever was drawn from the RNG before them.
    """
    cfg = _cfg("model.num_layers=4")
    torch.manual_seed(0)
    first = build_gpt_model(cfg, init_seed=5)
    torch.manual_seed(123)
    torch.randn(1000)
    second = build_gpt_model(cfg, init_seed=5)
    other_seed = build_gpt_model(cfg, init_seed=6)
    for i in range(4):
        a, b = first.decoder.layers[i], second.decoder.layers[i]
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(pa, pb), (i, name)
    w = lambda m: m.decoder.layers[2].self_attention.linear_qkv.linear_q.weight  # noqa: E731
    assert not torch.equal(w(first), w(other_seed))
    assert not torch.equal(
        first.decoder.layers[2].mlp.linear_fc1.weight, first.decoder.layers[3].mlp.linear_fc1.weight
    )
    # Without per-layer seeds the embedding follows the global RNG, as in stock Megatron.
    assert not torch.equal(
        first.embedding.word_embeddings.weight, second.embedding.word_embeddings.weight
    )


def test_layer_halves_split_at_half_the_layer_count():
    """Upper half is ``n > num_layers / 2``: the middle layer of an odd stack is lower."""
    from megatron_qk.models.layers import first_upper_layer, lower_layers, upper_layers

    assert upper_layers(4) == {3, 4} and lower_layers(4) == {1, 2}
    assert upper_layers(5) == {3, 4, 5} and lower_layers(5) == {1, 2}
    assert first_upper_layer(4) == min(upper_layers(4)) and first_upper_layer(5) == 3
