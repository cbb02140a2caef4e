"""Stock Megatron-Core checkpoint export: the fused ``linear_qkv`` layout, ``torch_dist`` format.

Our models keep W_Q, W_K, W_V as separate parameters (``SplitQKVLinear``); every other parameter
already has Megatron's name. The export builds a stock ``GPTModel`` from the local layer spec
(``get_gpt_layer_local_spec``), copies the weights in with Q/K/V re-interleaved into the fused
group-major layout (``split_qkv_to_fused``), and saves its ``sharded_state_dict`` with
``dist_checkpointing.save``. Such a checkpoint loads under any TP/PP layout. ``model_args.json``
records the ``TransformerConfig`` and ``GPTModel`` arguments that rebuild the matching model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.models.split_qkv import split_qkv_to_fused

MODEL_ARGS_FILE = "model_args.json"


def stock_model_args(cfg: ExperimentConfig) -> dict:
    """JSON-able arguments of the stock ``TransformerConfig``, layer spec and ``GPTModel``."""
    from megatron_qk.models.builder import padded_vocab_size

    m = cfg.model
    return {
        "layer_spec": {
            "function": "get_gpt_layer_local_spec",
            "normalization": _norm(m),
            "qk_layernorm": m.qk_layernorm,
        },
        "transformer_config": {
            "num_layers": m.num_layers,
            "hidden_size": m.hidden_size,
            "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.query_groups,
            "kv_channels": m.head_dim,
            "ffn_hidden_size": m.ffn_hidden_size,
            "gated_linear_unit": m.ffn != "gelu",
            "activation_func": "silu" if m.ffn == "swiglu" else "gelu (exact, erf)",
            "normalization": _norm(m),
            "layernorm_epsilon": m.norm_epsilon,
            "add_bias_linear": m.bias,
            "add_qkv_bias": m.bias,
            "qk_layernorm": m.qk_layernorm,
            "bias_activation_fusion": m.bias_activation_fusion,
        },
        "gpt_model": {
            "vocab_size": padded_vocab_size(cfg),
            "max_sequence_length": m.seq_length,
            "position_embedding_type": "rope",
            "rotary_base": m.rotary_base,
            "share_embeddings_and_output_weights": m.tie_embeddings,
        },
        "tokenizer_vocab_size": m.vocab_size,
    }


def _norm(m) -> str:
    return "RMSNorm" if m.normalization == "rmsnorm" else "LayerNorm"


def build_stock_model(cfg: ExperimentConfig):
    """A stock ``GPTModel`` (local spec, fused ``linear_qkv``) for this process's TP/PP stage."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_qk.models.builder import padded_vocab_size, transformer_config_from

    config = transformer_config_from(cfg)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(
            normalization=_norm(cfg.model), qk_layernorm=cfg.model.qk_layernorm
        ),
        vocab_size=padded_vocab_size(cfg),
        max_sequence_length=cfg.model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
    )


def fused_state_dict(state: dict, cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """Our one-process state dict with ``linear_q/k/v`` fused into stock ``linear_qkv`` tensors."""
    m = cfg.model
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("_extra_state") or ".linear_qkv.linear_" not in key:
            if not key.endswith("_extra_state"):
                out[key] = value
            continue
        prefix, rest = key.split(".linear_qkv.linear_", 1)
        which, name = rest.split(".", 1)
        if which != "q":
            continue  # fused once, at the q entry
        q, k, v = (state[f"{prefix}.linear_qkv.linear_{p}.{name}"] for p in "qkv")
        fused = split_qkv_to_fused(q, k, v, m.num_attention_heads, m.query_groups, m.head_dim)
        out[f"{prefix}.linear_qkv.{name}"] = fused
    return out


def write_megatron_checkpoint(out_dir: Path, loaded) -> list[Path]:
    """Save ``loaded.model`` (a one-process restore) as a stock ``torch_dist`` checkpoint.

    Returns:
        The files written at the top of ``out_dir``.
    """
    from megatron.core import dist_checkpointing

    cfg = loaded.cfg
    stock = build_stock_model(cfg)
    state = fused_state_dict(loaded.model.state_dict(), cfg)
    missing, unexpected = stock.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(stock.sharded_state_dict(), str(out_dir))
    args = out_dir / MODEL_ARGS_FILE
    args.write_text(json.dumps(stock_model_args(cfg), indent=2) + "\n", encoding="utf-8")
    return sorted(p for p in out_dir.iterdir() if p.is_file())
