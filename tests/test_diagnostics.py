"""Attention probes against hand-computed attention patterns, and the Q/K capture seam."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_qk.diagnostics.probes import (
    STATS,
    layer_statistics,
    normalized_entropy_sum,
    previous_occurrence,
    uniform_copy_sum,
)


def test_previous_occurrence_is_the_nearest_earlier_position():
    tokens = torch.tensor([[5, 7, 5, 5, 9, 7]])
    assert previous_occurrence(tokens).tolist() == [[-1, -1, 0, 2, -1, 1]]


def test_uniform_attention_statistics():
    """q = 0 makes every row uniform over its causal keys: entropy 1, copy mass 1/(i+1)."""
    s, b, heads, hn = 6, 1, 2, 4
    query = torch.zeros(s, b, heads, hn)
    key = torch.randn(s, b, heads, hn)
    tokens = torch.tensor([[5, 7, 5, 5, 9, 7]])
    per_head = layer_statistics(query, key, tokens, scale=0.5, chunk_size=4)
    assert per_head.shape == (heads, len(STATS), 2)
    assert STATS == ("copy", "entropy", "logit", "logit_abs")
    stats = per_head.sum(0)
    copy_sum, copy_count = stats[0].tolist()
    # Repeated positions 2, 3, 5 see 3, 4, 6 keys; two heads each.
    assert copy_count == 3 * heads
    # Six fp32 softmax outputs of <= 6 equal logits summed: a few roundings each, well inside
    # approx's default rel 1e-6 (gamma(12) = 7e-7 in tests/fp32_bounds.py).
    assert copy_sum == pytest.approx(heads * (1 / 3 + 1 / 4 + 1 / 6))
    ent_sum, ent_count = stats[1].tolist()
    # Uniform rows: entropy log(n) / log(n) from fp32 exp/log of <= 6 terms, a few ulps (6e-8 each).
    assert ent_count == (s - 1) * heads and ent_sum / ent_count == pytest.approx(1.0, abs=1e-6)
    assert stats[2, 0].item() == 0.0 and stats[2, 1].item() == heads * s * (s + 1) / 2
    assert stats[3, 0].item() == 0.0 and stats[3, 1].item() == heads * s * (s + 1) / 2  # |z| = 0


def test_uniform_copy_baseline_by_hand():
    """Positions with a previous occurrence (0-based i) get 1/(i+1) under uniform attention."""
    tokens = torch.tensor([[5, 7, 5, 5, 9, 7], [1, 1, 2, 3, 4, 2]])
    total, count = uniform_copy_sum(tokens)
    # Row 0: positions 2, 3, 5 repeat -> 1/3 + 1/4 + 1/6. Row 1: positions 1, 5 -> 1/2 + 1/6.
    assert count == 5
    assert total == pytest.approx((1 / 3 + 1 / 4 + 1 / 6) + (1 / 2 + 1 / 6), rel=1e-15)
    assert uniform_copy_sum(torch.tensor([[1, 2, 3]])) == (0.0, 0)  # no repeats: nothing counted
    # It is the copy score of attention that really is uniform (q = 0), head by head.
    s, heads = tokens.shape[1], 3
    query = torch.zeros(s, tokens.shape[0], heads, 4)
    key = torch.randn(s, tokens.shape[0], heads, 4)
    per_head = layer_statistics(query, key, tokens, scale=0.5)
    for h in range(heads):
        copy_sum, copy_count = per_head[h, 0].tolist()
        assert copy_count == count
        # fp32 softmax of equal logits: each probability within a few ulp of 1/(i+1).
        assert copy_sum == pytest.approx(total, rel=8 * torch.finfo(torch.float32).eps)


def test_sharp_copy_attention_and_gqa():
    """Keys equal to a one-hot of the token, queries a large multiple: attention picks the
    earlier occurrences of the same token; with one key group shared by two query heads."""
    tokens = torch.tensor([[0, 1, 0, 2, 1]])
    s, vocab = tokens.shape[1], 4
    onehot = torch.nn.functional.one_hot(tokens[0], vocab).float()  # [s, vocab]
    key = onehot[:, None, None, :]  # [s, 1, 1 group, vocab]
    query = 50.0 * onehot[:, None, None, :].expand(s, 1, 2, vocab)
    stats = layer_statistics(query, key, tokens, scale=1.0).sum(0)
    # Position 2 (token 0) attends to positions 0 and 2 equally (the diagonal counts too):
    # mass 0.5 on the nearest previous occurrence; position 4 (token 1): same with position 1.
    assert stats[0, 1].item() == 2 * 2
    # Two equal logits (50) against others at 0: each non-matching weight is e^-50 ~ 2e-22, far
    # below fp32 resolution of 0.5, so the mass is 0.5 to a few ulps (abs 1e-6).
    assert stats[0, 0].item() / stats[0, 1].item() == pytest.approx(0.5, abs=1e-6)
    assert stats[1, 0].item() / stats[1, 1].item() < 0.5  # sharp rows: low entropy


def test_entropy_floor_term_has_finite_gradients():
    torch.manual_seed(0)
    query = torch.randn(8, 2, 4, 16, requires_grad=True)
    key = torch.randn(8, 2, 2, 16, requires_grad=True)
    total, count = normalized_entropy_sum(query, key, scale=0.25)
    tokens = torch.zeros(2, 8).long()
    reference = layer_statistics(query.detach(), key.detach(), tokens, 0.25).sum(0)
    assert total.item() / count == pytest.approx(reference[1, 0].item() / reference[1, 1].item())
    (total / count).backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(key.grad).all()
    assert query.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk", [3, 8])
def test_chunked_recomputed_entropy_floor_equals_the_full_computation(chunk):
    """Chunks of query rows under checkpointing give the full computation's value and gradients.

    Tolerance: the chunked sum adds the same fp32 terms in another order (at most
    2 x 4 x 8 = 64 of them, each a normalised entropy <= 1), so the sums differ by at most
    64 x 2^-24 relative; each gradient element comes from its own row's identical arithmetic.
    """
    torch.manual_seed(1)
    q0 = torch.randn(8, 2, 4, 16)
    k0 = torch.randn(8, 2, 2, 16)
    results = []
    for chunk_size in (None, chunk):
        query, key = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        total, count = normalized_entropy_sum(query, key, 0.25, chunk_size)
        (total / count).backward()
        results.append((total.detach(), count, query.grad, key.grad))
    (t_full, n_full, gq_full, gk_full), (t_chunk, n_chunk, gq_chunk, gk_chunk) = results
    assert n_full == n_chunk == 2 * 4 * 7
    eps = 64 * 2.0**-24
    torch.testing.assert_close(t_chunk, t_full, rtol=eps, atol=0)
    torch.testing.assert_close(gq_chunk, gq_full, rtol=1e-5, atol=eps * gq_full.abs().max())
    torch.testing.assert_close(gk_chunk, gk_full, rtol=1e-5, atol=eps * gk_full.abs().max())


def test_capture_sees_post_rope_qk_and_leaves_output_unchanged():
    from megatron_qk.config.loader import load_config
    from megatron_qk.diagnostics.recorder import AttentionRecorder
    from megatron_qk.models.builder import build_gpt_model
    from megatron_qk.training.distributed import setup_distributed, teardown_distributed

    cfg = load_config("tiny", ["model.vocab_size=64", "model.vocab_pad_multiple=8"])
    setup_distributed(cfg)
    try:
        model = build_gpt_model(cfg, init_seed=1)
        recorder = AttentionRecorder([model], cfg.model.num_layers)
        tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(64).expand(2, -1)
        plain = model(tokens, pos, attention_mask=None)
        with recorder.statistics():
            recorder.set_tokens(tokens)
            probed = model(tokens, pos, attention_mask=None)
        torch.testing.assert_close(probed, plain, rtol=0, atol=0)
        record = recorder.reduce(torch.device("cpu"))
        assert set(record["layers"]) == {"1", "2", "3", "4"}
        for key in ("lower_copy", "upper_entropy", "lower_entropy", "upper_logit", "lower_logit"):
            assert math.isfinite(record[key]), key
        assert 0.0 < record["upper_entropy"] <= 1.0
        # No probe stays attached after the block.
        assert all(core.mqk_probe is None for core in recorder.layers)
    finally:
        teardown_distributed()


def test_one_hot_attention_has_zero_entropy():
    """Each query matches only its own key with a huge logit: one-hot rows, entropy 0, and the
    logit RMS is the hand-computed value."""
    s, hn = 5, 8
    basis = torch.eye(hn)[:s]  # orthonormal keys
    key = basis[:, None, None, :]
    query = 1000.0 * basis[:, None, None, :]
    stats = layer_statistics(query, key, torch.arange(s)[None], scale=1.0)[0]
    # Logit gaps of 1000: off-diagonal weights e^-1000 underflow to 0, so entropy is 0 up to the
    # rounding of -p log p at p = 1 (a few ulps).
    assert stats[1, 0].item() / stats[1, 1].item() == pytest.approx(0.0, abs=1e-6)
    # Causal pairs: s*(s+1)/2; only the s diagonal ones are non-zero (1000 each).
    assert stats[2, 1].item() == s * (s + 1) / 2
    assert math.sqrt(stats[2, 0].item() / stats[2, 1].item()) == pytest.approx(
        1000.0 * math.sqrt(s / (s * (s + 1) / 2))
    )
    # No token repeats: no copy positions.
    assert stats[0, 1].item() == 0


def test_per_head_statistics_are_independent_per_head():
    """Head 0 uniform, head 1 sharp: per-head rows report each head's own pattern."""
    s, hn = 6, 8
    basis = torch.eye(hn)[:s]
    key = basis[:, None, None, :].expand(s, 1, 2, hn).contiguous()
    query = torch.stack([torch.zeros(s, hn), 1000.0 * basis], dim=1)[:, None]  # [s, 1, 2, hn]
    stats = layer_statistics(query, key, torch.arange(s)[None], scale=1.0)
    entropy = stats[:, 1, 0] / stats[:, 1, 1]
    # Exactly uniform (zero logits) and one-hot (gap 1000) rows: a few ulps of fp32 exp/log.
    assert entropy.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_bilinear_singular_value_of_a_known_form():
    from megatron_qk.diagnostics.bilinear import (
        bilinear_displacement,
        bilinear_top_singular_value,
    )

    d = 6
    e = torch.eye(d)
    # Head 0: W_q^T W_k = 3 e0 e1^T + 2 e2 e3^T -> singular values 3, 2.
    wq0 = torch.stack([3 * e[0], 2 * e[2]])
    wk0 = torch.stack([e[1], e[3]])
    # Head 1 shares key group 0 (GQA): W_q = 5 e4 (row 0) only -> 5 e4 e1^T, sigma 5.
    wq1 = torch.stack([5 * e[4], torch.zeros(d)])
    wq = torch.stack([wq0, wq1])  # [2 heads, hn, d]
    wk = wk0[None]  # [1 group, hn, d]
    assert bilinear_top_singular_value(wq, wk).tolist() == pytest.approx([3.0, 5.0])
    # Against the dense d x d product for random weights.
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 10), torch.randn(3, 4, 10)
    dense = torch.linalg.matrix_norm(a.transpose(1, 2) @ b, ord=2)
    torch.testing.assert_close(bilinear_top_singular_value(a, b).float(), dense)
    # Displacement: ||A^T B - A0^T B0||_2 against the dense difference.
    a0, b0 = torch.randn(3, 4, 10), torch.randn(3, 4, 10)
    dense = torch.linalg.matrix_norm(a.transpose(1, 2) @ b - a0.transpose(1, 2) @ b0, ord=2)
    torch.testing.assert_close(bilinear_displacement(a, b, a0, b0).float(), dense)
    assert bilinear_displacement(a, b, a, b).abs().max().item() < 1e-9


@pytest.mark.parametrize("rmsnorm", [False, True], ids=["layernorm", "rmsnorm"])
def test_norm_jvp_equals_autograd(rmsnorm):
    """The locality estimator's map of FFN writes is the exact Jacobian of the input norm."""
    from megatron_qk.diagnostics.locality import norm_jvp

    torch.manual_seed(0)
    x = torch.randn(5, 16, dtype=torch.float64) * 3 + 1
    f = 0.5 * x + torch.randn(5, 16, dtype=torch.float64)  # correlated with x, as FFN writes are
    gamma, eps = torch.rand(16, dtype=torch.float64) + 0.5, 1e-5
    if rmsnorm:
        norm = torch.nn.RMSNorm(16, eps=eps, dtype=torch.float64)
    else:
        norm = torch.nn.LayerNorm(16, eps=eps, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(gamma)
    _, expected = torch.func.jvp(norm, (x,), (f,))
    torch.testing.assert_close(norm_jvp(x, f, gamma, eps, rmsnorm), expected)
