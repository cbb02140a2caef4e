"""Parameter roles and counts.

Contract used by the optimizer rules and the diagnostics: after :func:`annotate_param_roles`,
every parameter carries

* ``param.mqk_layer_number``: the *global* 1-based ``layer_number`` of the transformer layer that
  owns it (``None`` outside transformer layers). Megatron numbers layers locally per pipeline
  stage in module names (``decoder.layers.0`` on every stage) but ``layer.layer_number`` is
  global, so a rule selects the same parameters whatever the TP/PP layout.
* ``param.mqk_role``: one of ``q k v qkv o fc1 fc2 norm q_norm k_norm embedding output
  final_norm other`` (``qkv`` is the fused projection when ``model.split_qkv`` is false;
  ``q_norm``/``k_norm`` the per-head query/key norms of ``model.qk_layernorm``).
"""

from __future__ import annotations

import torch

from megatron_qk.config.model import ModelConfig

# Parameter attributes set by annotate_param_roles (the contract above).
LAYER_ATTR = "mqk_layer_number"
ROLE_ATTR = "mqk_role"

ROLES = (
    "q",
    "k",
    "v",
    "qkv",
    "o",
    "fc1",
    "fc2",
    "norm",
    "q_norm",
    "k_norm",
    "embedding",
    "output",
    "final_norm",
)

# (substring of the parameter name inside a layer, role); first match wins.
_LAYER_RULES = (
    ("self_attention.linear_qkv.linear_q.", "q"),
    ("self_attention.linear_qkv.linear_k.", "k"),
    ("self_attention.linear_qkv.linear_v.", "v"),
    ("self_attention.linear_qkv.layer_norm", "norm"),  # TE fused input norm
    ("self_attention.linear_qkv.", "qkv"),
    ("self_attention.linear_proj.", "o"),
    ("mlp.linear_fc1.layer_norm", "norm"),  # TE fused pre-MLP norm
    ("mlp.linear_fc1.", "fc1"),
    ("mlp.linear_fc2.", "fc2"),
    ("input_layernorm.", "norm"),
    ("pre_mlp_layernorm.", "norm"),
    ("q_layernorm.", "q_norm"),
    ("k_layernorm.", "k_norm"),
)


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def annotate_param_roles(model: torch.nn.Module) -> dict[str, tuple[int | None, str]]:
    """Tag every parameter with ``mqk_layer_number`` and ``mqk_role`` (see module docstring).

    Returns:
        ``{parameter name: (layer_number, role)}`` for inspection and tests.
    """
    gpt = bare_model(model)
    out: dict[str, tuple[int | None, str]] = {}
    seen: set[int] = set()
    for layer_idx, layer in enumerate(gpt.decoder.layers):
        for name, param in layer.named_parameters():
            role = next((r for key, r in _LAYER_RULES if key in name), "other")
            setattr(param, LAYER_ATTR, int(layer.layer_number))
            setattr(param, ROLE_ATTR, role)
            seen.add(id(param))
            out[f"decoder.layers.{layer_idx}.{name}"] = (int(layer.layer_number), role)
    for name, param in gpt.named_parameters():
        if id(param) in seen:
            continue
        if name.startswith("embedding."):
            role = "embedding"
        elif name.startswith("output_layer."):
            role = "output"
        elif name.startswith("decoder.final_layernorm"):
            role = "final_norm"
        else:
            role = "other"
        setattr(param, LAYER_ATTR, None)
        setattr(param, ROLE_ATTR, role)
        out[name] = (None, role)
    return out


def count_parameters(model: torch.nn.Module) -> dict:
    """Parameters of this rank's model chunk, tied weights counted once.

    With PP > 1 the last stage holds a copy of the tied embedding (Megatron keeps the two in sync
    by an all-reduce): sum per-rank counts over TP/PP ranks and subtract that copy to get the
    model total. The dry run builds the model unsharded, so its ``total`` is the model total.
    """
    gpt = bare_model(model)
    unique: dict[int, tuple[str, torch.Tensor]] = {}
    for name, param in gpt.named_parameters():
        unique.setdefault(id(param), (name, param))
    buckets = {"embedding": 0, "attention": 0, "ffn": 0, "norms": 0, "output": 0, "other": 0}
    for name, param in unique.values():
        n = param.numel()
        if name.startswith("embedding."):
            buckets["embedding"] += n
        elif name.startswith("output_layer."):
            buckets["output"] += n
        elif "self_attention." in name and "layer_norm" not in name and "layernorm" not in name:
            buckets["attention"] += n
        elif "mlp." in name and "layer_norm" not in name:
            buckets["ffn"] += n
        elif "norm" in name:
            buckets["norms"] += n
        else:
            buckets["other"] += n
    total = sum(buckets.values())
    return {"total": total, **buckets}


def expected_parameter_count(model_cfg: ModelConfig, padded_vocab: int) -> int:
    """Closed-form parameter count of the whole model (what the builder must produce)."""
    h, hn = model_cfg.hidden_size, model_cfg.head_dim
    heads, groups = model_cfg.num_attention_heads, model_cfg.query_groups
    ffn = model_cfg.ffn_hidden_size
    gated = model_cfg.ffn in ("swiglu", "geglu")
    b = 1 if model_cfg.bias else 0
    norm = 2 * h if model_cfg.normalization == "layernorm" else h
    qkv_out = (heads + 2 * groups) * hn
    attention = h * qkv_out + b * qkv_out + heads * hn * h + b * h
    fc1_out = ffn * (2 if gated else 1)
    mlp = h * fc1_out + b * fc1_out + ffn * h + b * h
    # QK-norm: one norm of size head_dim for the queries and one for the keys of a layer.
    qk_norm = 2 * (norm // h) * hn if model_cfg.qk_layernorm else 0
    per_layer = attention + mlp + 2 * norm + qk_norm
    embedding = padded_vocab * h
    output = 0 if model_cfg.tie_embeddings else padded_vocab * h
    return embedding + model_cfg.num_layers * per_layer + norm + output
