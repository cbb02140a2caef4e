"""Throughput fields of train lines (model FLOPs, MFU, peak memory) and the profiler window."""

from __future__ import annotations

import json
import math

import pytest

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import load_config
from megatron_qk.models.builder import padded_vocab_size
from megatron_qk.models.flops import flops_per_token, throughput_fields


def megatron_lm_formula(cfg, vocab: int) -> float:
    """Megatron-LM's ``num_floating_point_operations`` (dense branch) per token, in its own
    arrangement: 12 * L * h^2 * (attention + MLP + logit terms)."""
    m = cfg.model
    h, s, layers = m.hidden_size, m.seq_length, m.num_layers
    q_ratio = m.num_attention_heads * m.head_dim / h
    gated = 3 / 2 if m.ffn in ("swiglu", "geglu") else 1
    attention = (1 + m.query_groups / m.num_attention_heads + s / h / 2) * q_ratio
    mlp = m.ffn_hidden_size / h * gated
    logit = vocab / (2 * layers * h)
    return 12 * layers * h * h * (attention + mlp + logit)


@pytest.mark.parametrize("preset", ["gpt-270m", "llama-270m", "gpt-0.7b", "gpt-2.7b", "tiny"])
def test_flops_per_token_is_megatron_lms_formula(preset):
    cfg = load_config(preset)
    vocab = padded_vocab_size(cfg)
    ours = flops_per_token(cfg.model, vocab)
    want = megatron_lm_formula(cfg, vocab)
    # Integers up to ~1e10 against a float expression: a few ulps of 2^-52 relative.
    assert abs(ours - want) <= 1e-12 * want


def test_gpt_270m_flops_per_token():
    """The worked example of docs/THROUGHPUT.md: 1.7348 GFLOP per token."""
    cfg = load_config("gpt-270m")
    assert padded_vocab_size(cfg) == 50304
    # per layer 6*960*(4*960) + 6*1024*960 + 6*2*960*3840, x20, + 6*960*50304
    assert flops_per_token(cfg.model, 50304) == 1_734_819_840


def test_gated_gqa_counts_three_ffn_matrices_and_fewer_kv_rows():
    base = load_config("tiny", ["model.num_query_groups=2"])
    gated = load_config("tiny", ["model.num_query_groups=2", "model.ffn=swiglu"])
    mha = load_config("tiny")
    h, f, layers = 64, 256, 4
    assert flops_per_token(gated.model, 64) - flops_per_token(base.model, 64) == (
        layers * 6 * h * f
    )
    # 4 heads of 16 -> 2 groups: K and V lose 2 heads each, 2*h*(2*16) fewer MACs per layer.
    assert flops_per_token(mha.model, 64) - flops_per_token(base.model, 64) == (
        layers * 6 * h * 2 * 2 * 16
    )


def test_throughput_fields_arithmetic():
    out = throughput_fields(
        tokens=1000, seconds=0.5, flops_token=10**9, num_gpus=4, peak_tflops_per_gpu=2.0
    )
    assert out["tokens_per_second"] == 2000.0
    assert out["tflops_per_gpu"] == pytest.approx(2000 * 1e9 / 4 / 1e12, rel=1e-15)
    assert out["mfu"] == pytest.approx(out["tflops_per_gpu"] / 2.0, rel=1e-15)


def test_config_checks_profile_steps_and_peak():
    with pytest.raises(ConfigError, match="profile_steps"):
        load_config("tiny", ["training.profile_steps=[3, 2]"])
    with pytest.raises(ConfigError, match="profile_steps"):
        load_config("tiny", ["training.profile_steps=[0, 2]"])
    with pytest.raises(ConfigError, match="peak_tflops_per_gpu"):
        load_config("tiny", ["logging.peak_tflops_per_gpu=0"])


def test_train_lines_carry_throughput_and_the_profiler_writes_a_trace(tmp_path):
    from megatron_qk.training.entry import train_from_config

    run = tmp_path / "run"
    cfg = load_config(
        "tiny",
        [
            f"training.output_dir={run}",
            "model.num_layers=2",
            "model.hidden_size=32",
            "model.ffn_hidden_size=64",
            "model.seq_length=16",
            "model.vocab_size=64",
            "model.vocab_pad_multiple=8",
            "training.train_steps=3",
            "training.eval_interval=0",
            "training.profile_steps=[2, 3]",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            "logging.peak_tflops_per_gpu=0.5",
            "diagnostics.enabled=false",
        ],
    )
    train_from_config(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    flops = flops_per_token(cfg.model, padded_vocab_size(cfg))
    for r in train:
        tokens = cfg.training.global_batch_size * cfg.model.seq_length
        assert r["tokens_per_second"] == pytest.approx(tokens / r["step_seconds"], rel=1e-12)
        assert r["tflops_per_gpu"] == pytest.approx(
            flops * r["tokens_per_second"] / 1e12, rel=1e-12
        )
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 0.5, rel=1e-12)
        assert r["peak_memory_gib"] > 0 and math.isfinite(r["peak_memory_gib"])
    traces = sorted((run / "profile").iterdir())
    assert [t.name for t in traces] == ["rank0_steps2-3.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("ProfilerStep" in e.get("name", "") or e.get("ph") == "X" for e in events)
