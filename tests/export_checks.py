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


def assert_megatron_export_matches(run_dir: Path, out: Path) -> None:
    """Export ``run_dir`` as a stock checkpoint; a stock GPTModel built from ``model_args.json``
    (local spec, fused ``linear_qkv``) loads it and gives our logits (same fp32 sums)."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_qk.models.builder import transformer_config_from

    args = ["export", "--checkpoint", str(run_dir), "--format", "megatron", "--out", str(out)]
    assert cli_main(args) == 0
    loaded = load_checkpoint_for_analysis(run_dir, device=torch.device("cpu"))
    spec_args = json.loads((out / "model_args.json").read_text())
    layer_spec = spec_args["layer_spec"]
    stock = GPTModel(
        config=transformer_config_from(loaded.cfg),
        transformer_layer_spec=get_gpt_layer_local_spec(
            normalization=layer_spec["normalization"], qk_layernorm=layer_spec["qk_layernorm"]
        ),
        **spec_args["gpt_model"],
    )
    dist_checkpointing.load(stock.sharded_state_dict(), str(out))
    names = [k for k in stock.state_dict() if "self_attention" in k and "extra" not in k]
    assert any(k.endswith("linear_qkv.weight") for k in names)
    assert not any(".linear_q." in k for k in names)
    positions = torch.arange(TOKENS.shape[1])[None].expand_as(TOKENS)
    with torch.no_grad():
        ours = loaded.model(TOKENS, positions, attention_mask=None)
        theirs = stock.eval()(TOKENS, positions, attention_mask=None)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
