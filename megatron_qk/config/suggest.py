""" "Did you mean" for an unknown recipe key: a close spelling in the same section, the same name
in another section, or the key a name from another trainer (Megatron-LM, nanoGPT, torchtitan,
transformers) corresponds to (``training.learning_rate`` -> ``optim.lr``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import get_args, get_origin

from megatron_qk.config.schema import ExperimentConfig

# Names other trainers use -> this recipe's key. Each target is a real key
# (tests/test_config_messages.py checks it).
ALIASES: dict[str, str] = {
    "learning_rate": "optim.lr",
    "lr": "optim.lr",
    "max_lr": "optim.lr",
    "min_lr": "optim.min_lr_ratio",
    "warmup": "optim.warmup_frac",
    "warmup_steps": "optim.warmup_frac",
    "warmup_iters": "optim.warmup_frac",
    "lr_warmup_fraction": "optim.warmup_frac",
    "lr_decay_style": "optim.decay_style",
    "adam_beta1": "optim.beta1",
    "adam_beta2": "optim.beta2",
    "adam_eps": "optim.eps",
    "grad_clip": "optim.clip_grad",
    "max_grad_norm": "optim.clip_grad",
    "max_norm": "optim.clip_grad",
    "batch_size": "training.global_batch_size",
    "train_iters": "training.train_steps",
    "max_iters": "training.train_steps",
    "max_steps": "training.train_steps",
    "steps": "training.train_steps",
    "save": "training.output_dir",
    "save_dir": "training.output_dir",
    "out_dir": "training.output_dir",
    "dtype": "training.precision",
    "bf16": "training.precision",
    "fp16": "training.precision",
    "mixed_precision": "training.precision",
    "block_size": "model.seq_length",
    "seq_len": "model.seq_length",
    "max_seq_len": "model.seq_length",
    "n_layer": "model.num_layers",
    "n_layers": "model.num_layers",
    "n_embd": "model.hidden_size",
    "dim": "model.hidden_size",
    "n_head": "model.num_attention_heads",
    "n_heads": "model.num_attention_heads",
    "n_kv_heads": "model.num_query_groups",
    "num_key_value_heads": "model.num_query_groups",
    "intermediate_size": "model.ffn_hidden_size",
    "dropout": "model.hidden_dropout",
    "tensor_parallel": "parallel.tensor_model_parallel_size",
    "pipeline_parallel": "parallel.pipeline_model_parallel_size",
    "data_path": "data.train_prefixes",
    "train_data_path": "data.train_prefixes",
    "valid_data_path": "data.valid_prefixes",
}


def _sections(cls: type = ExperimentConfig, prefix: str = "") -> dict[str, list[str]]:
    """Dotted section path -> its field names (list items as ``section[]``)."""
    hints = typing.get_type_hints(cls)
    out = {prefix: [f.name for f in dataclasses.fields(cls) if f.init]}
    for name in out[prefix]:
        tp = hints[name]
        if get_origin(tp) is list:
            tp, name = get_args(tp)[0], f"{name}[]"
        if dataclasses.is_dataclass(tp):
            out.update(_sections(tp, f"{prefix}.{name}" if prefix else name))
    return out


def all_keys() -> list[str]:
    """Every dotted key of a recipe (list items as ``optim.rules[].name``)."""
    return [
        f"{sec}.{name}" if sec else name for sec, names in _sections().items() for name in names
    ]


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def suggest(section: str, known: list[str], key: str, limit: int = 3) -> list[str]:
    """Dotted keys the unknown ``section.key`` may have meant, best first (may be empty).

    Args:
        section: the dotted path of the mapping holding the key ("" for the top level;
            list items as ``optim.rules[0]``).
        known: the field names of that mapping.
        key: the unknown key.
    """
    prefix = f"{section}." if section else ""
    found = [prefix + m for m in difflib.get_close_matches(key, known, n=limit, cutoff=0.6)]
    if "[" not in section:  # other sections: only from the recipe's plain sections
        norm = key.lower().replace("-", "_")
        keys = [k for k in all_keys() if "[]" not in k and k != prefix + key]
        leaves = {}
        for k in keys:
            leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        if norm in ALIASES:
            found.append(ALIASES[norm])
        found += leaves.get(norm, [])
        for leaf in difflib.get_close_matches(norm, list(leaves), n=limit, cutoff=0.8):
            found += leaves[leaf]
    return _dedupe(found)[:limit]
