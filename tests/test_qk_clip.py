"""QK-clip (``optim.qk_clip``): the update equals Megatron-Core's ``clip_qk``, the collected max
logit, biased logits, config errors, the console field. (Training runs, the fp32 master copy and
2-process layouts: tests/test_qk_clip_training.py.)
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from small_model import SMALL

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import load_config
from megatron_qk.models.builder import build_gpt_model, transformer_config_from
from megatron_qk.models.split_qkv import fused_qkv_to_split, split_qkv_to_fused
from megatron_qk.optim.qk_clip import QKClip


def _cfg(*overrides: str):
    return load_config("tiny", [*SMALL, *overrides])


def _forward(model, cfg, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length), generator=g)
    model(tokens, torch.arange(cfg.model.seq_length).expand(2, -1), attention_mask=None)


def _qkv_keys(state: dict) -> list[str]:
    return [k for k in state if "linear_qkv.weight" in k or "linear_qkv.bias" in k]


def _split_twin(stock, split, groups: int, hn: int) -> None:
    """Load ``stock``'s weights (fused Q/K/V) into the split-Q/K/V model ``split``."""
    state = split.state_dict()
    for key, value in stock.state_dict().items():
        if key in _qkv_keys(stock.state_dict()):
            prefix, kind = key.rsplit(".", 1)
            for part, tensor in zip("qkv", fused_qkv_to_split(value, 4, groups, hn)):
                state[f"{prefix}.linear_{part}.{kind}"] = tensor
        elif key in state:
            state[key] = value
    split.load_state_dict(state)


def _refused_logits(groups: int, layer: int) -> torch.Tensor:
    """Per-head max logits with some groups over the threshold 2.0 and some under."""
    g = torch.Generator().manual_seed(layer)
    return torch.rand(4, generator=g) * 4 + torch.tensor([0.5, 1.0, 3.0, 0.2])


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_clip_equals_megatron_clip_qk_on_the_fused_model(single_rank, groups):
    """Our update on split Q/K/V (and on the fused weight) is Megatron-Core's ``clip_qk``,
    bit for bit, given the same weights and per-head max logits (GQA included; bias false)."""
    from megatron.core.optimizer.qk_clip import clip_qk

    common = (f"model.num_query_groups={groups}", "model.bias=false")
    clip = ("optim.qk_clip.enabled=true", "optim.qk_clip.threshold=2.0", "optim.qk_clip.alpha=0.3")
    stock_cfg = _cfg(*common, *clip, "model.split_qkv=false")
    split_cfg = _cfg(*common, *clip)
    megatron_config = transformer_config_from(
        stock_cfg, qk_clip=True, qk_clip_threshold=2.0, qk_clip_alpha=0.3
    )
    stock = build_gpt_model(stock_cfg, config=megatron_config, init_seed=7)
    fused = build_gpt_model(stock_cfg, init_seed=11)
    fused.load_state_dict(stock.state_dict())
    split = build_gpt_model(split_cfg, init_seed=13)
    hn = stock_cfg.model.head_dim
    _split_twin(stock, split, groups, hn)
    before = {k: v.clone() for k, v in stock.state_dict().items() if v is not None}
    for model in (stock, fused, split):
        for i, layer in enumerate(model.decoder.layers):
            layer.self_attention.core_attention.current_max_attn_logits = _refused_logits(groups, i)
    # Megatron's clip_qk walks model_chunk.module.module (DDP, Float16Module): two wrappers.
    want = clip_qk([types.SimpleNamespace(module=types.SimpleNamespace(module=stock))])
    got_split = QKClip(split_cfg.optim.qk_clip, [split], None, 2).after_step()
    got_fused = QKClip(stock_cfg.optim.qk_clip, [fused], None, 2).after_step()
    assert got_split == got_fused == pytest.approx(want, rel=0, abs=0)
    after, fused_after, split_after = stock.state_dict(), fused.state_dict(), split.state_dict()
    for key in _qkv_keys(after):
        prefix = key.rsplit(".", 1)[0]
        parts = [split_after[f"{prefix}.linear_{p}.weight"] for p in "qkv"]
        ours = split_qkv_to_fused(*parts, 4, groups, hn)
        torch.testing.assert_close(ours, after[key], rtol=0, atol=0)
        torch.testing.assert_close(fused_after[key], after[key], rtol=0, atol=0)
        q0, k0, v0 = fused_qkv_to_split(before[key], 4, groups, hn)
        q1, k1, v1 = fused_qkv_to_split(after[key], 4, groups, hn)
        assert not torch.equal(q0, q1) and not torch.equal(k0, k1)  # a group was clipped
        torch.testing.assert_close(v1, v0, rtol=0, atol=0)


def test_megatron_clip_qk_runs_on_the_logits_we_collect(single_rank):
    """Our collection fills Megatron's ``current_max_attn_logits`` so that its own
    ``SelfAttention.clip_qk`` runs on it (fused model, GQA), and the stock fused model and our
    split twin collect the same logits and come out of the clip with the same weights."""
    from megatron.core.optimizer.qk_clip import clip_qk

    common = ("model.num_query_groups=2", "model.bias=false", "optim.qk_clip.enabled=true")
    stock_cfg = _cfg(*common, "model.split_qkv=false")
    split_cfg = _cfg(*common)
    stock = build_gpt_model(stock_cfg, config=transformer_config_from(stock_cfg, qk_clip=True))
    split = build_gpt_model(split_cfg, init_seed=13)
    _split_twin(stock, split, 2, stock_cfg.model.head_dim)
    clips = []
    for model, cfg in ((stock, stock_cfg), (split, split_cfg)):
        clips.append(QKClip(cfg.optim.qk_clip, [model], None, 2))
        clips[-1].collect(True)
        _forward(model, cfg)
        clips[-1].collect(False)
    layers = zip(stock.decoder.layers, split.decoder.layers)
    collected = [a.self_attention.core_attention.current_max_attn_logits for a, _ in layers]
    for layer, want in zip(split.decoder.layers, collected):
        torch.testing.assert_close(
            layer.self_attention.core_attention.current_max_attn_logits, want, rtol=0, atol=0
        )
    threshold = float(torch.stack(collected).median())  # some groups over it, some not
    for model in (stock, split):
        for layer in model.decoder.layers:
            layer.self_attention.config.qk_clip_threshold = threshold
    clips[1].cfg = dataclasses.replace(clips[1].cfg, threshold=threshold)
    clip_qk([types.SimpleNamespace(module=types.SimpleNamespace(module=stock))])
    clips[1].after_step()
    assert clips[1].last_etas
    for a, b in zip(stock.decoder.layers, split.decoder.layers):
        q, k = (
            b.self_attention.linear_qkv.linear_q.weight,
            b.self_attention.linear_qkv.linear_k.weight,
        )
        fused = split_qkv_to_fused(
            q, k, b.self_attention.linear_qkv.linear_v.weight, 4, 2, stock_cfg.model.head_dim
        )
        torch.testing.assert_close(fused, a.self_attention.linear_qkv.weight, rtol=0, atol=0)


def _capture(model):
    """Attach a probe to every layer that keeps the (query, key) the kernel is given."""
    seen = {}
    for layer in model.decoder.layers:
        core = layer.self_attention.core_attention

        def probe(core, query, key, number=layer.layer_number):
            seen[number] = (query.detach().clone(), key.detach().clone(), core)

        core.mqk_probe = probe
    return seen


def _direct_max_logits(query, key, scale: float) -> torch.Tensor:
    """``scale * max_{b, j <= i} q_i . k_j`` per query head, in float64, one head at a time."""
    s, _, heads, _ = query.shape
    per_group = heads // key.shape[2]
    out = []
    for h in range(heads):
        q = query[:, :, h].double()  # [s, b, hn]
        k = key[:, :, h // per_group].double()
        logits = torch.einsum("ibd,jbd->bij", q, k) * scale
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        out.append(logits[:, causal].max())
    return torch.stack(out)


@pytest.mark.parametrize("groups", [4, 2])
def test_collected_max_logit_is_the_direct_causal_max(single_rank, groups):
    """The per-head max equals softmax_scale x max over causal positions of the post-RoPE q.k
    the kernel sees (keys expanded for GQA), beside the diagnostics probe; max over passes."""
    cfg = _cfg(f"model.num_query_groups={groups}", "optim.qk_clip.log_only=true")
    model = build_gpt_model(cfg, init_seed=5)
    clip = QKClip(cfg.optim.qk_clip, [model], None, 2)
    seen = _capture(model)
    clip.collect(True)
    direct = {}
    for seed in (0, 1):  # two micro-batches of one step: the max over both
        _forward(model, cfg, seed)
        for number, (q, k, core) in seen.items():
            d = _direct_max_logits(q, k, core.softmax_scale or q.shape[-1] ** -0.5)
            direct[number] = d if number not in direct else torch.maximum(direct[number], d)
    clip.collect(False)
    held = {}
    for layer in model.decoder.layers:
        got = layer.self_attention.core_attention.current_max_attn_logits
        assert got.shape == (4,) and got.dtype == torch.float32
        # fp32 dot products of length hn=8 against float64: a few fp32 ulps of |q||k|.
        torch.testing.assert_close(got.double(), direct[layer.layer_number], rtol=1e-5, atol=1e-6)
        held[layer.layer_number] = got
    _forward(model, cfg, 2)  # collection off (evaluation passes): nothing is folded in
    for layer in model.decoder.layers:
        assert (
            layer.self_attention.core_attention.current_max_attn_logits is held[layer.layer_number]
        )


def test_biased_logits_of_the_same_inputs_land_on_the_threshold(single_rank):
    """With Q/K biases scaled with their weights every logit of the same inputs shrinks by
    exactly eta: layer 1 (whose inputs no clip changes) then peaks at the threshold."""
    cfg = _cfg("model.num_query_groups=2", "model.bias=true", "optim.qk_clip.enabled=true")
    model = build_gpt_model(cfg, init_seed=5)
    g = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if ".linear_q.bias" in name or ".linear_k.bias" in name:  # trained biases are not 0
            param.data.copy_(torch.randn(param.shape, generator=g))
    probe = QKClip(cfg.optim.qk_clip, [model], None, 2)
    probe.collect(True)
    _forward(model, cfg)
    first = model.decoder.layers[0].self_attention.core_attention.current_max_attn_logits.clone()
    grouped = first.view(2, 2).amax(dim=1)
    assert (grouped > 0).all()
    threshold = 0.5 * float(grouped.min())  # every group over it
    clip_cfg = dataclasses.replace(cfg.optim.qk_clip, threshold=threshold)
    QKClip(clip_cfg, [model], None, 2).after_step()
    probe.collect(True)
    _forward(model, cfg)
    again = model.decoder.layers[0].self_attention.core_attention.current_max_attn_logits
    # eta * logit in fp32: a few ulps of rounding in eta**alpha * eta**(1 - alpha) and in q.k.
    want = torch.full((2,), threshold)
    torch.testing.assert_close(again.view(2, 2).amax(dim=1), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optim.qk_clip.alpha=1.5"], "optim.qk_clip.alpha"),
        (["optim.qk_clip.threshold=0"], "optim.qk_clip.threshold"),
        (["optim.qk_clip.threshold=-1"], "optim.qk_clip.threshold"),
        (["optim.qk_clip.enabled=true", "optim.qk_clip.log_only=true"], "optim.qk_clip.log_only"),
        (["optim.qk_clip.enabled=true", "optim.qk_clip.layers=3-9"], "optim.qk_clip.layers"),
        (["optim.qk_clip.enabled=true", "optim.qk_clip.layers=top"], "optim.qk_clip.layers"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", overrides)


def test_qk_clip_with_qk_layernorm_is_refused_by_name():
    """With QK-norm after W_Q/W_K, rescaling them leaves the logits unchanged."""
    with pytest.raises(ConfigError, match=r"optim\.qk_clip\.enabled.*qk_layernorm"):
        load_config("tiny", ["optim.qk_clip.enabled=true", "model.qk_layernorm=true"])
    # Logging the max logit of a QK-norm model is fine.
    load_config("tiny", ["optim.qk_clip.log_only=true", "model.qk_layernorm=true"])


def test_console_line_shows_the_max_logit_only_when_collected():
    from megatron_qk.training.console import format_step_line

    record = {
        "step": 3, "tokens": 1536, "loss": 10.5, "lr": 1e-3, "grad_norm": 1.0,
        "step_seconds": 0.5, "tokens_per_second": 3000.0, "tflops_per_gpu": 0.1, "mfu": 0.01,
    }  # fmt: skip
    assert "max logit" not in format_step_line(record, 4, None)
    line = format_step_line({**record, "max_attention_logit": 0.065912}, 4, None)
    assert "| max logit 0.06591 |" in line
