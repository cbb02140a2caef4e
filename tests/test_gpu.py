"""GPU-only checks (marker ``gpu``; skipped where CUDA is unavailable): the Q/K capture and the
diagnostics under Transformer Engine attention in bf16 agree with the local fp32 spec, and a
bf16 training run with the paper's rule and live diagnostics completes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_qk.config.loader import load_config

pytestmark = pytest.mark.gpu


def _record(model, num_layers: int, tokens: torch.Tensor) -> dict:
    from megatron_qk.diagnostics.recorder import AttentionRecorder

    recorder = AttentionRecorder([model], num_layers)
    pos = torch.arange(tokens.shape[1], device="cuda").expand_as(tokens)
    with torch.no_grad(), recorder.statistics():
        recorder.set_tokens(tokens)
        model(tokens, pos, attention_mask=None)
    return recorder.reduce(torch.device("cuda"))


def test_te_attention_is_captured_in_bf16(single_rank):
    """The capture seam works on Transformer Engine's core attention; bf16 statistics agree
    with the same TE model in fp32 (the bf16 twin is built from the same seed: a built model
    cannot be deep-copied, see tests/gpu_twins.py)."""
    from gpu_twins import seeded_twins

    from megatron_qk.models.specs import te_available

    assert te_available(), "GPU test environments must provide Transformer Engine (NGC image)"
    cfg = load_config(
        "tiny", ["model.vocab_size=64", "model.vocab_pad_multiple=8", "model.impl=te"]
    )
    model, twin = seeded_twins(cfg, seed=5, device="cuda")
    core = model.decoder.layers[0].self_attention.core_attention
    assert type(core).__name__.startswith("QKCapturingTE"), type(core).__name__
    tokens = torch.randint(0, 64, (2, 64), device="cuda")
    fp32 = _record(model, cfg.model.num_layers, tokens)
    bf16 = _record(twin.to(torch.bfloat16), cfg.model.num_layers, tokens)
    for key in ("lower_copy", "upper_entropy", "lower_entropy", "upper_logit", "upper_qk_sigma"):
        assert math.isfinite(bf16[key]), key
        assert bf16[key] == pytest.approx(fp32[key], rel=0.05), key


def test_bf16_training_with_rule_and_diagnostics(tmp_path):
    from megatron_qk.training.entry import train_from_config

    cfg = load_config(
        "tiny",
        [
            f"training.output_dir={tmp_path / 'run'}",
            "training.train_steps=12",
            "training.eval_interval=3",
            "training.precision=bf16",
            "logging.progress_bar=false",
            "optim.rules=[{name: upper_qk, threshold: 0.01, patience: 1, min_frac: 0.2}]",
        ],
    )
    summary = train_from_config(cfg)
    assert summary["finished"] and math.isfinite(summary["final_val_loss"])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    diags = [r for r in lines if r["kind"] == "diag"]
    assert diags and all(math.isfinite(r["upper_entropy"]) for r in diags)
    assert "upper_qk" in summary["release"]
