"""Hugging Face transformers export: our GPTModel's weights as an existing transformers class.

Only architectures that compute exactly our function are written; anything else is refused with
:class:`ExportError` naming the piece no transformers class has.

* GPT-style blocks (LayerNorm, non-gated exact GELU, RoPE) -> ``GPTNeoXForCausalLM`` with
  ``use_parallel_residual=False`` (x + attn(ln1(x)), then + mlp(ln2(.)), as Megatron) and
  ``partial_rotary_factor=1.0`` (Megatron rotates the whole head). Both use the rotate-half RoPE
  convention with ``inv_freq = 1 / base^(2i/d)``, scale attention scores by ``1/sqrt(head_dim)``
  and put biases on every linear. NeoX's ``query_key_value`` rows are head-major ``[q_h; k_h;
  v_h]``, which is exactly Megatron's fused layout when every head is its own group (MHA).
  NeoX's MLP always has biases: a ``bias: false`` model gets zero biases there (the same
  function; fine-tuning would train them).
* LLaMA-style blocks (RMSNorm, gated FFN: SwiGLU -> ``silu``, GEGLU -> exact ``gelu``) ->
  ``LlamaForCausalLM`` (grouped-query attention, ``attention_bias``/``mlp_bias`` follow
  ``model.bias``). Megatron's ``linear_fc1`` holds ``[gate; up]`` (``act(x1) * x2``).
* LLaMA-style blocks with QK-norm (``model.qk_layernorm``) -> ``Qwen3ForCausalLM``: Qwen3's
  ``q_norm``/``k_norm`` are RMSNorms of size ``head_dim`` applied to each head before RoPE, as
  Megatron's ``q_layernorm``/``k_layernorm``. Qwen3's MLP has no biases, so ``bias: true`` is
  refused. OLMo-2 normalises the whole query/key projection (all heads together), another
  function, and GPT-NeoX has no QK-norm: GPT-style QK-norm models are refused by name.

The embedding and output layer are cut to the tokenizer's vocabulary: the padded rows of
Megatron's table are never indexed, and our evaluation normalises over the real vocabulary only
(``logits[..., :vocab_size]``), so the exported logits equal ours on every real id.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_qk.config.extras import require
from megatron_qk.config.model import ModelConfig
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.models.split_qkv import fused_qkv_to_split, split_qkv_to_fused


class ExportError(ValueError):
    """The model or tokenizer cannot be written in the requested format."""


# Megatron activation -> transformers ACT2FN name computing the same function in fp32.
_HF_ACTIVATION = {"gelu": "gelu", "swiglu": "silu", "geglu": "gelu"}


def hf_architecture(m: ModelConfig) -> str:
    """The transformers class that computes ``m`` exactly.

    Raises:
        ExportError: naming the configuration piece no transformers class reproduces.
    """
    if m.bias_activation_fusion:
        raise ExportError(
            "model.bias_activation_fusion: true uses the tanh GELU approximation in training; "
            "the exported activations are exact (erf), so the export would be another function"
        )
    if m.qk_layernorm:
        if m.normalization != "rmsnorm" or m.ffn == "gelu":
            raise ExportError(
                "model.qk_layernorm: true is exported as Qwen3 (RMSNorm, gated FFN, per-head "
                f"RMS QK-norm); normalization: {m.normalization} with ffn: {m.ffn} has no "
                "transformers class with per-head QK-norm (GPT-NeoX has none; OLMo-2 normalises "
                "all heads together)"
            )
        if m.bias:
            raise ExportError(
                "model.qk_layernorm: true with model.bias: true: Qwen3's MLP has no biases"
            )
        return "Qwen3ForCausalLM"
    if m.normalization == "layernorm":
        if m.ffn != "gelu":
            raise ExportError(
                f"model.ffn: {m.ffn} with normalization: layernorm: no transformers class has a "
                "gated FFN with LayerNorm (GPT-NeoX is non-gated, Llama uses RMSNorm)"
            )
        if m.query_groups != m.num_attention_heads:
            raise ExportError(
                f"model.num_query_groups: {m.query_groups} (grouped-query attention) with "
                "LayerNorm: GPT-NeoX has no grouped-query attention"
            )
        return "GPTNeoXForCausalLM"
    if m.ffn == "gelu":
        raise ExportError(
            "model.ffn: gelu (non-gated) with normalization: rmsnorm: no transformers class "
            "combines RMSNorm with a non-gated FFN"
        )
    return "LlamaForCausalLM"


def hf_config(cfg: ExperimentConfig, vocab_size: int, eod_id: int) -> dict:
    """The ``config.json`` contents for ``cfg.model`` (see :func:`hf_architecture`)."""
    m = cfg.model
    arch = hf_architecture(m)
    common = {
        "architectures": [arch],
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "intermediate_size": m.ffn_hidden_size,
        "hidden_act": _HF_ACTIVATION[m.ffn],
        "max_position_embeddings": m.seq_length,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "dtype": "float32",
        "torch_dtype": "float32",  # the key transformers < 5 and other readers (vLLM) look for
        "use_cache": True,
    }
    if arch == "GPTNeoXForCausalLM":
        return {
            **common,
            "model_type": "gpt_neox",
            "layer_norm_eps": m.norm_epsilon,
            "use_parallel_residual": False,
            "attention_bias": m.bias,
            "hidden_dropout": 0.0,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": float(m.rotary_base),
                "partial_rotary_factor": 1.0,
            },
            # The same values under the keys of transformers < 5 (NeoX's default rotary_pct is
            # 0.25: a reader that missed it would rotate a quarter of each head).
            "rotary_pct": 1.0,
            "rotary_emb_base": float(m.rotary_base),
        }
    llama = {
        **common,
        "model_type": "llama",
        "num_key_value_heads": m.query_groups,
        "head_dim": m.head_dim,
        "rms_norm_eps": m.norm_epsilon,
        "attention_bias": m.bias,
        "mlp_bias": m.bias,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "rope_theta": float(m.rotary_base),  # the key of transformers < 5
    }
    if arch == "Qwen3ForCausalLM":
        del llama["mlp_bias"]
        return {**llama, "model_type": "qwen3", "use_sliding_window": False}
    return llama


def _split_qkv(state: dict, prefix: str, m: ModelConfig, name: str):
    """Q, K, V (weight or bias ``name``) of one layer, from split or fused storage."""
    split_key = f"{prefix}linear_qkv.linear_q.{name}"
    if split_key in state:
        return tuple(state[f"{prefix}linear_qkv.linear_{p}.{name}"] for p in "qkv")
    fused = state.get(f"{prefix}linear_qkv.{name}")
    if fused is None:
        return None
    return fused_qkv_to_split(fused, m.num_attention_heads, m.query_groups, m.head_dim)


def _bias(state: dict, key: str, size: int, zero_fill: bool) -> torch.Tensor | None:
    if key in state and state[key] is not None:
        return state[key]
    return torch.zeros(size) if zero_fill else None


def hf_state_dict(state: dict, cfg: ExperimentConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Map a one-process ``GPTModel`` state dict onto the transformers parameter names.

    Args:
        state: ``model.state_dict()`` of an unsharded (TP = PP = 1) model.
        cfg: the run's recipe.
        vocab_size: the tokenizer's vocabulary; embedding/output rows beyond it are padding.
    """
    m = cfg.model
    neox = hf_architecture(m) == "GPTNeoXForCausalLM"
    out: dict[str, torch.Tensor] = {}
    base = "gpt_neox." if neox else "model."
    embed = state["embedding.word_embeddings.weight"][:vocab_size]
    out[base + ("embed_in.weight" if neox else "embed_tokens.weight")] = embed
    for i in range(m.num_layers):
        src = f"decoder.layers.{i}."
        att = src + "self_attention."
        dst = f"{base}layers.{i}."
        norms = (
            ("input_layernorm", "input_layernorm"),
            ("pre_mlp_layernorm", "post_attention_layernorm"),
        )
        for ours, theirs in norms:
            for kind in ("weight", "bias") if neox else ("weight",):
                out[f"{dst}{theirs}.{kind}"] = state[f"{src}{ours}.{kind}"]
        q, k, v = _split_qkv(state, att, m, "weight")
        qkv_bias = _split_qkv(state, att, m, "bias")
        fc1 = state[src + "mlp.linear_fc1.weight"]
        fc1_bias = state.get(src + "mlp.linear_fc1.bias")
        if neox:
            heads = m.num_attention_heads  # MHA: every head is its own group
            qkv = split_qkv_to_fused(q, k, v, heads, heads, m.head_dim)
            out[dst + "attention.query_key_value.weight"] = qkv
            if qkv_bias is not None:
                fused_bias = split_qkv_to_fused(*qkv_bias, heads, heads, m.head_dim)
                out[dst + "attention.query_key_value.bias"] = fused_bias
            out[dst + "attention.dense.weight"] = state[att + "linear_proj.weight"]
            if m.bias:
                out[dst + "attention.dense.bias"] = state[att + "linear_proj.bias"]
            out[dst + "mlp.dense_h_to_4h.weight"] = fc1
            out[dst + "mlp.dense_h_to_4h.bias"] = _bias(
                state, src + "mlp.linear_fc1.bias", m.ffn_hidden_size, zero_fill=True
            )
            out[dst + "mlp.dense_4h_to_h.weight"] = state[src + "mlp.linear_fc2.weight"]
            out[dst + "mlp.dense_4h_to_h.bias"] = _bias(
                state, src + "mlp.linear_fc2.bias", m.hidden_size, zero_fill=True
            )
            continue
        for name, w in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
            out[f"{dst}self_attn.{name}.weight"] = w
        if m.qk_layernorm:  # Qwen3: one RMSNorm of size head_dim for the queries, one for keys
            out[dst + "self_attn.q_norm.weight"] = state[att + "q_layernorm.weight"]
            out[dst + "self_attn.k_norm.weight"] = state[att + "k_layernorm.weight"]
        if qkv_bias is not None:
            for name, b in zip(("q_proj", "k_proj", "v_proj"), qkv_bias):
                out[f"{dst}self_attn.{name}.bias"] = b
        out[dst + "self_attn.o_proj.weight"] = state[att + "linear_proj.weight"]
        gate, up = fc1.chunk(2, dim=0)  # Megatron's GLU: act(first half) * second half
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
        if m.bias:
            out[dst + "self_attn.o_proj.bias"] = state[att + "linear_proj.bias"]
            gate_b, up_b = fc1_bias.chunk(2, dim=0)
            out[dst + "mlp.gate_proj.bias"] = gate_b
            out[dst + "mlp.up_proj.bias"] = up_b
            out[dst + "mlp.down_proj.bias"] = state[src + "mlp.linear_fc2.bias"]
    final = "final_layer_norm" if neox else "norm"
    for kind in ("weight", "bias") if neox else ("weight",):
        out[f"{base}{final}.{kind}"] = state[f"decoder.final_layernorm.{kind}"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    # safetensors refuses views that share storage; every tensor gets its own contiguous copy.
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def write_hf_model(
    out_dir: Path, cfg: ExperimentConfig, state: dict, vocab_size: int, eod_id: int
) -> list[Path]:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors``.

    Returns:
        The files written.
    """
    save_file = require("safetensors.torch", "export --format hf").save_file

    config = hf_config(cfg, vocab_size, eod_id)
    tensors = hf_state_dict(state, cfg, vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "config.json", out_dir / "generation_config.json"]
    paths[0].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": eod_id, "eos_token_id": eod_id}
    paths[1].write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    weights = out_dir / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return [*paths, weights]
