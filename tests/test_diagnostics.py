"""Attention probes against hand-computed attention patterns, and the Q/K capture seam."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_qk.diagnostics.probes import (
    layer_statistics,
    normalized_entropy_sum,
    previous_occurrence,
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
    stats = layer_statistics(query, key, tokens, scale=0.5, chunk_size=4)
    copy_sum, copy_count = stats[0].tolist()
    # Repeated positions 2, 3, 5 see 3, 4, 6 keys; two heads each.
    assert copy_count == 3 * heads
    assert copy_sum == pytest.approx(heads * (1 / 3 + 1 / 4 + 1 / 6))
    ent_sum, ent_count = stats[1].tolist()
    assert ent_count == (s - 1) * heads and ent_sum / ent_count == pytest.approx(1.0, abs=1e-6)
    assert stats[2, 0].item() == 0.0 and stats[2, 1].item() == heads * s * (s + 1) / 2


def test_sharp_copy_attention_and_gqa():
    """Keys equal to a one-hot of the token, queries a large multiple: attention picks the
    earlier occurrences of the same token; with one key group shared by two query heads."""
    tokens = torch.tensor([[0, 1, 0, 2, 1]])
    s, vocab = tokens.shape[1], 4
    onehot = torch.nn.functional.one_hot(tokens[0], vocab).float()  # [s, vocab]
    key = onehot[:, None, None, :]  # [s, 1, 1 group, vocab]
    query = 50.0 * onehot[:, None, None, :].expand(s, 1, 2, vocab)
    stats = layer_statistics(query, key, tokens, scale=1.0)
    # Position 2 (token 0) attends to positions 0 and 2 equally (the diagonal counts too):
    # mass 0.5 on the nearest previous occurrence; position 4 (token 1): same with position 1.
    assert stats[0, 1].item() == 2 * 2
    assert stats[0, 0].item() / stats[0, 1].item() == pytest.approx(0.5, abs=1e-6)
    assert stats[1, 0].item() / stats[1, 1].item() < 0.5  # sharp rows: low entropy


def test_entropy_floor_term_has_finite_gradients():
    torch.manual_seed(0)
    query = torch.randn(8, 2, 4, 16, requires_grad=True)
    key = torch.randn(8, 2, 2, 16, requires_grad=True)
    total, count = normalized_entropy_sum(query, key, scale=0.25)
    reference = layer_statistics(query.detach(), key.detach(), torch.zeros(2, 8).long(), 0.25)
    assert total.item() / count == pytest.approx(reference[1, 0].item() / reference[1, 1].item())
    (total / count).backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(key.grad).all()
    assert query.grad.abs().sum() > 0


def test_capture_sees_post_rope_qk_and_leaves_output_unchanged():
    from megatron_qk.config.loader import load_config
    from megatron_qk.diagnostics.capture import AttentionRecorder
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
