"""QK-norm (``model.qk_layernorm``): Megatron-Core's own function, seen by every probe, trainable.

Our split-Q/K/V model with QK-norm must compute exactly what Megatron-Core's stock
``qk_layernorm`` GPTModel (local spec, fused ``linear_qkv``) computes on the same weights; the
core-attention capture (entropy/logit probes, the Q/K ablation, the max-logit collection) must
see the normalised queries and keys; the bilinear statistics must describe the post-norm form;
rules can select the norm weights by role; and a QK-norm run trains, resumes and diagnoses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from small_model import SMALL as SMALL_SHAPE

from megatron_qk.cli import main as cli_main
from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import load_config
from megatron_qk.diagnostics.bilinear import (
    bilinear_top_singular_value,
    qk_head_weights,
    qk_logit_factors,
)
from megatron_qk.models.builder import (
    build_gpt_model,
    padded_vocab_size,
    transformer_config_from,
)
from megatron_qk.models.params import (
    annotate_param_roles,
    count_parameters,
    expected_parameter_count,
)
from megatron_qk.models.split_qkv import fused_qkv_to_split
from megatron_qk.training.entry import train_from_config

SMALL = (*SMALL_SHAPE, "model.qk_layernorm=true")


def _cfg(*overrides: str):
    return load_config("tiny", [*SMALL, *overrides])


def _logits(model, cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length), generator=g)
    positions = torch.arange(cfg.model.seq_length).expand(2, -1)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None)


def _stock_qk_norm_model(cfg):
    """Megatron-Core's own QK-norm GPT: stock local spec with ``qk_layernorm``, fused QKV."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    norm = "RMSNorm" if cfg.model.normalization == "rmsnorm" else "LayerNorm"
    torch.manual_seed(5)
    return GPTModel(
        config=transformer_config_from(cfg),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=norm, qk_layernorm=True),
        vocab_size=padded_vocab_size(cfg),
        max_sequence_length=cfg.model.seq_length,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
    )


@pytest.mark.parametrize(
    ("norm", "groups", "bias"),
    [("layernorm", 4, True), ("rmsnorm", 2, False), ("rmsnorm", 1, True)],
)
def test_qk_norm_equals_megatron_stock_qk_layernorm(single_rank, norm, groups, bias):
    cfg = _cfg(
        f"model.normalization={norm}", f"model.num_query_groups={groups}", f"model.bias={bias}"
    )
    stock = _stock_qk_norm_model(cfg)
    ours = build_gpt_model(cfg, init_seed=11)
    assert count_parameters(ours)["total"] == expected_parameter_count(
        cfg.model, padded_vocab_size(cfg)
    )
    assert count_parameters(ours)["total"] == count_parameters(stock)["total"]
    # Norm gains (and LayerNorm offsets) away from their init of 1 (0): a model that skipped or
    # misplaced the norms would then differ.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                p.copy_(p + 0.5 * torch.randn(p.shape, generator=g))
    hn = cfg.model.head_dim
    state = ours.state_dict()
    for key, value in stock.state_dict().items():
        kind = key.rsplit(".", 1)[-1]
        if key.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            prefix = key.rsplit(".", 1)[0]
            for part, tensor in zip("qkv", fused_qkv_to_split(value, 4, groups, hn)):
                state[f"{prefix}.linear_{part}.{kind}"] = tensor
        elif key in state:
            state[key] = value
    assert any("q_layernorm" in k for k in state) and any("k_layernorm" in k for k in state)
    ours.load_state_dict(state)
    want = _logits(stock, cfg)
    torch.testing.assert_close(_logits(ours, cfg), want, rtol=0, atol=0)
    # Negative control: one key-norm gain changed changes the function.
    with torch.no_grad():
        ours.decoder.layers[1].self_attention.k_layernorm.weight[0] += 1.0
    assert not torch.allclose(_logits(ours, cfg), want)


def test_capture_sees_the_normalised_queries_and_keys(single_rank):
    """RMSNorm with unit gains gives every head's query and key RMS 1 before RoPE (epsilon made
    negligible: at init the projections are small, and 1e-5 would move the RMS by 0.2%); RoPE
    rotates pairs of channels, so the captured (post-RoPE) vectors have norm sqrt(head_dim).
    Without QK-norm they do not."""
    seen: dict[bool, list[torch.Tensor]] = {}
    for qk_norm in (True, False):
        cfg = _cfg(
            "model.normalization=rmsnorm",
            f"model.qk_layernorm={qk_norm}",
            "model.norm_epsilon=1e-12",
        )
        model = build_gpt_model(cfg, init_seed=2)
        seen[qk_norm] = []
        for layer in model.decoder.layers:
            core = layer.self_attention.core_attention
            core.mqk_probe = lambda _core, q, k, out=seen[qk_norm]: out.extend((q, k))
        _logits(model, cfg)
        assert len(seen[qk_norm]) == 4
    hn = 32 // 4
    for tensor in seen[True]:
        norms = tensor.double().norm(dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(hn)), rtol=1e-4, atol=0)
    assert all((t.double().norm(dim=-1) - math.sqrt(hn)).abs().max() > 0.5 for t in seen[False])


def test_bilinear_statistics_describe_the_post_norm_form(single_rank):
    cfg = _cfg("model.normalization=rmsnorm", "model.num_query_groups=2")
    model = build_gpt_model(cfg, init_seed=2)
    attn = model.decoder.layers[1].self_attention
    with torch.no_grad():
        attn.q_layernorm.weight.copy_(torch.linspace(0.5, 2.0, 8))
        attn.k_layernorm.weight.copy_(torch.linspace(-3.0, 1.0, 8))
    wq, wk = qk_logit_factors(attn)
    assert wq.shape == (4, 8, 8) and wk.shape == (2, 8, 8)
    sigma = bilinear_top_singular_value(wq.float(), wk.float())
    want = (torch.linspace(0.5, 2.0, 8) * torch.linspace(-3.0, 1.0, 8)).abs().max()
    torch.testing.assert_close(sigma, torch.full((4,), float(want), dtype=torch.float64))
    # Without QK-norm the factors are the projection weights themselves.
    plain = build_gpt_model(_cfg("model.qk_layernorm=false"), init_seed=2)
    a, c = qk_logit_factors(plain.decoder.layers[1].self_attention)
    b, d = qk_head_weights(plain.decoder.layers[1].self_attention)
    assert torch.equal(a, b) and torch.equal(c, d)


def test_norm_roles_and_rules(single_rank):
    cfg = _cfg()
    roles = annotate_param_roles(build_gpt_model(cfg, init_seed=1))
    by_role: dict[str, list[str]] = {}
    for name, (_layer, role) in roles.items():
        by_role.setdefault(role, []).append(name)
    assert sorted(by_role["q_norm"]) == [
        f"decoder.layers.{i}.self_attention.q_layernorm.{kind}"
        for i in (0, 1)
        for kind in ("bias", "weight")
    ]
    assert all("k_layernorm" in n for n in by_role["k_norm"]) and len(by_role["k_norm"]) == 4
    assert not any("layernorm" in n for n in by_role.get("norm", []) if "q_" in n or "k_" in n)
    rule = (
        "optim.rules=[{name: slow_norms, layers: upper_half, roles: [q_norm, k_norm], "
        "multiplier: 0.5, release: never}]"
    )
    assert load_config("tiny", [*SMALL, rule]).optim.rules[0].roles == ["q_norm", "k_norm"]
    with pytest.raises(ConfigError, match=r"optim.rules\[0\].roles.*model.qk_layernorm: true"):
        load_config("tiny", [*SMALL, "model.qk_layernorm=false", rule])


def test_qk_norm_run_trains_resumes_bit_exactly_and_diagnoses(tmp_path):
    def cfg(run: Path, *extra: str):
        return load_config(
            "tiny",
            [
                "model.qk_layernorm=true",
                f"training.output_dir={run}",
                "training.train_steps=4",
                "training.eval_interval=2",
                "training.save_interval=2",
                "logging.progress_bar=false",
                "logging.tensorboard=false",
                *extra,
            ],
        )

    whole = train_from_config(cfg(tmp_path / "whole"))
    train_from_config(cfg(tmp_path / "split", "training.exit_after_steps=2"))
    resumed = train_from_config(cfg(tmp_path / "split"))
    assert resumed["steps"] == whole["steps"] == 4

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r.get("kind") == "train"]

    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == 4
    args = ["diagnose", "--checkpoint", str(tmp_path / "split"), "--num-sequences", "2"]
    assert cli_main(args) == 0
    report = json.loads((tmp_path / "split" / "diagnose.json").read_text())
    assert report["results"]


def test_a_checkpoint_with_qk_norm_names_the_key_when_loaded_without(tmp_path):
    from megatron_qk.training.checkpoint_settings import (
        CheckpointMismatchError,
        check_model_settings,
        model_settings,
    )

    recorded = model_settings(_cfg().model)
    with pytest.raises(CheckpointMismatchError, match="model.qk_layernorm"):
        check_model_settings(
            tmp_path, recorded, model_settings(_cfg("model.qk_layernorm=false").model), "x"
        )
    older = {k: v for k, v in recorded.items() if k != "qk_layernorm"}  # written before the key
    check_model_settings(tmp_path, older, model_settings(_cfg().model), "x")


def test_identity_of_runs_recorded_before_qk_norm_and_qk_clip_existed():
    """Both switches are hashed only away from their defaults (so a run or table index recorded
    before they existed keeps its identity); logging the max logit is not part of the identity."""
    import copy

    from megatron_qk.config.identity import config_hash
    from megatron_qk.config.loader import config_to_dict

    recipe = config_to_dict(load_config("tiny"))
    older = copy.deepcopy(recipe)  # the recipe as the code before the two keys wrote it
    del older["model"]["qk_layernorm"]
    del older["optim"]["qk_clip"]
    assert config_hash(older) == config_hash(recipe)
    for changed in ("model.qk_layernorm=true", "optim.qk_clip.enabled=true"):
        assert config_hash(config_to_dict(load_config("tiny", [changed]))) != config_hash(recipe)
    logged = config_to_dict(load_config("tiny", ["optim.qk_clip.log_only=true"]))
    assert config_hash(logged) == config_hash(recipe)


def test_a_run_recorded_before_the_switches_existed_resumes(tmp_path):
    """Its config.yaml has no model.qk_layernorm / optim.qk_clip: resuming with both at their
    defaults is the same run; turning one on is refused, naming it."""
    import yaml

    run = tmp_path / "old"

    def cfg(*extra: str):
        return load_config(
            "tiny",
            [
                f"training.output_dir={run}",
                "training.train_steps=2",
                "training.eval_interval=0",
                "diagnostics.enabled=false",
                "logging.progress_bar=false",
                "logging.tensorboard=false",
                *extra,
            ],
        )

    train_from_config(cfg("training.exit_after_steps=1"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["qk_layernorm"]  # as the code before the two keys wrote it
    del saved["optim"]["qk_clip"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match="model.qk_layernorm"):
        train_from_config(cfg("model.qk_layernorm=true"))
    assert train_from_config(cfg("optim.qk_clip.log_only=true"))["steps"] == 2
