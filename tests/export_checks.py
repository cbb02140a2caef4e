"""Shared check: a run's HF export computes our logits (used by test_export and test_training)."""

import json
from pathlib import Path

import torch

from megatron_qk.cli import main as cli_main
from megatron_qk.training.restore import load_checkpoint_for_analysis

# Two sequences exercising every position of the tiny preset (seq_length 64) and several ids.
TOKENS = torch.tensor(
    [[(i * 7919 + 13) % 50257 for i in range(64)], [(i * 31) % 500 for i in range(64)]]
)


def assert_hf_export_matches(run_dir: Path, out: Path) -> dict:
    """Export ``run_dir`` with the CLI and compare logits on :data:`TOKENS`; returns config.json."""
    from transformers import AutoModelForCausalLM

    assert (
        cli_main(["export", "--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    )
    loaded = load_checkpoint_for_analysis(run_dir, device=torch.device("cpu"))
    vocab = json.loads((out / "export.json").read_text())["tokenizer"]["vocab"]
    positions = torch.arange(TOKENS.shape[1])[None].expand_as(TOKENS)
    with torch.no_grad():
        ours = loaded.model(TOKENS, positions, attention_mask=None)[..., :vocab]
        hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        theirs = hf(TOKENS).logits
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    return json.loads((out / "config.json").read_text())
