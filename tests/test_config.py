"""Strict recipe loading: unknown keys, wrong types, inconsistent values, presets, overrides."""

from pathlib import Path

import pytest
import yaml
from conftest import assert_paper_rule

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import (
    dump_config,
    list_presets,
    load_config,
    load_resolved_config,
)


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_presets_load_and_match_the_paper():
    assert {"tiny", "gpt-270m", "llama-270m", "gpt-0.7b", "gpt-2.7b"} <= set(list_presets())
    gpt = load_config("gpt-270m")
    assert (gpt.model.num_layers, gpt.model.hidden_size, gpt.model.num_attention_heads) == (
        20,
        960,
        15,
    )
    assert (gpt.model.ffn, gpt.model.ffn_hidden_size, gpt.model.normalization) == (
        "gelu",
        3840,
        "layernorm",
    )
    assert gpt.model.bias and gpt.model.tie_embeddings and gpt.model.seq_length == 1024
    assert gpt.training.global_batch_size * gpt.model.seq_length == 524_288
    assert gpt.training.train_tokens == 2_500_000_000
    assert (gpt.optim.lr, gpt.optim.min_lr_ratio, gpt.optim.warmup_frac) == (2.5e-4, 0.1, 0.02)
    assert (gpt.optim.weight_decay, gpt.optim.beta1, gpt.optim.beta2) == (0.1, 0.9, 0.95)
    assert gpt.training.precision == "bf16"
    llama = load_config("llama-270m")
    assert (llama.model.ffn, llama.model.ffn_hidden_size) == ("swiglu", 2560)
    assert (llama.model.normalization, llama.model.bias) == ("rmsnorm", False)
    big = load_config("gpt-0.7b")
    assert (big.model.num_layers, big.model.hidden_size, big.model.num_attention_heads) == (
        22,
        1536,
        12,
    )
    assert big.model.ffn_hidden_size == 6144 and big.optim.lr == 2.0e-4
    assert big.training.train_tokens == 7_000_000_000
    scale = load_config("gpt-2.7b")
    assert (
        scale.parallel.tensor_model_parallel_size * scale.parallel.pipeline_model_parallel_size > 1
    )


def test_unknown_key_names_path_and_line(tmp_path):
    path = write(tmp_path, "base: tiny\nmodel:\n  hidden_sise: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.path == "model.hidden_sise"
    assert "unknown key" in str(err.value) and f"{path}:3" in str(err.value)


def test_wrong_type_names_path(tmp_path):
    path = write(tmp_path, "base: tiny\ntraining:\n  micro_batch_size: four\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.path == "training.micro_batch_size"
    assert "expected an integer" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["model.bias=1"])
    assert err.value.path == "model.bias" and "true/false" in str(err.value)
    assert "--set model.bias=1" in str(err.value)


@pytest.mark.parametrize(
    "override, path, fragment",
    [
        ("model.hidden_size=66", "model.hidden_size", "not divisible by num_attention_heads"),
        ("parallel.tensor_model_parallel_size=3", "parallel.tensor_model_parallel_size", "TP=3"),
        (
            "parallel.pipeline_model_parallel_size=3",
            "parallel.pipeline_model_parallel_size",
            "PP=3",
        ),
        ("training.micro_batch_size=3", "training.global_batch_size", "micro_batch_size"),
        ("model.num_query_groups=3", "model.num_query_groups", "must divide"),
        ("model.ffn=relu", "model.ffn", "must be one of"),
        ("optim.rules=[{name: a, roles: [q, w]}]", "optim.rules[0].roles", "unknown roles"),
        ("training.train_tokens=1000", "training.train_steps", "exactly one"),
    ],
)
def test_inconsistent_values(override, path, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert err.value.path == path, str(err.value)
    assert fragment in str(err.value)


def test_world_size_checks():
    cfg = load_config("tiny", ["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="not divisible by TP x PP"):
        cfg.validate_world(3)
    cfg = load_config("tiny", ["training.global_batch_size=4", "training.micro_batch_size=4"])
    cfg.validate_world(1)
    with pytest.raises(ConfigError) as err:
        cfg.validate_world(2)
    assert err.value.path == "training.global_batch_size" and "data-parallel" in str(err.value)


def test_overrides_and_base_chain(tmp_path):
    write(tmp_path, "base: tiny\nname: mid\noptim:\n  lr: 1.0e-3\n", "mid.yaml")
    top = write(tmp_path, "base: mid.yaml\narm: intervention\n", "top.yaml")
    cfg = load_config(top, ["optim.rules=[{name: upper_qk}]", "training.train_steps=7"])
    assert (cfg.name, cfg.arm, cfg.optim.lr) == ("mid", "intervention", 1.0e-3)
    assert cfg.training.train_steps == 7 and cfg.planned_steps() == 7
    rule = cfg.optim.rules[0]
    assert_paper_rule(rule)


def test_circular_base_and_missing_files(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config("gpt-270m", ["arm=intervention"])
    text = dump_config(cfg, extra={"git_sha": "abc"})
    assert yaml.safe_load(text)["_meta"]["git_sha"] == "abc"
    path = write(tmp_path, text, "config.yaml")
    assert load_resolved_config(path) == cfg


def test_train_tokens_rounds_up_to_steps():
    cfg = load_config("gpt-270m")
    assert cfg.planned_steps() == -(-2_500_000_000 // 524_288) == 4769


def test_exponent_numbers_without_a_dot_are_numbers():
    """PyYAML reads "1e-2" as a string (YAML 1.1); number fields accept it anyway."""
    cfg = load_config("tiny", ["optim.lr=1e-2", "training.save_interval=3e2"])
    assert cfg.optim.lr == 0.01 and cfg.training.save_interval == 300
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config("tiny", ["optim.lr=fast"])
