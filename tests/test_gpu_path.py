"""The GPU (Transformer Engine) path, checked on CPU as far as CPU allows.

Transformer Engine is not importable here, so its spec is built through a CPU stand-in of
Megatron's ``TESpecProvider``: the same module *shapes* (input norm fused into ``linear_qkv`` and
``linear_fc1``, the TE spec's own keys map) with local kernels. That is enough to check the spec
call, the checkpoint key layout shared by both implementations, the meta-device build and the
device selection; the numerics of the real TE kernels are ``tools/gpu_check.sh``'s job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_qk.config.loader import load_config
from megatron_qk.models import builder, specs
from megatron_qk.models.checkpoint_layout import (
    canonical_sharded_state_dict,
    is_extra_state_key,
    load_canonical_state_dict,
)

SMALL = (
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=48",
    "model.seq_length=16",
    "model.vocab_size=100",
    "model.vocab_pad_multiple=8",
)


class CPULayerNormColumnParallelLinear(ColumnParallelLinear):
    """CPU stand-in for ``TELayerNormColumnParallelLinear``: the input norm inside the linear,
    stored as ``layer_norm_weight`` / ``layer_norm_bias`` as TE stores it."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.normalization = config.normalization
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))
        if config.normalization == "LayerNorm":
            self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size))

    def forward(self, x, weight=None, runtime_gather_output=None):
        size = (x.shape[-1],)
        if self.normalization == "LayerNorm":
            x = F.layer_norm(x, size, self.layer_norm_weight, self.layer_norm_bias, self.eps)
        else:
            x = F.rms_norm(x, size, self.layer_norm_weight, self.eps)
        return super().forward(x, weight, runtime_gather_output)


class CPUTESpecProvider(LocalSpecProvider):
    """``TESpecProvider`` with local kernels: TE's fused norm+linear shape, torch norms."""

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self):
        return CPULayerNormColumnParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        return WrappedTorchNorm


def _use_cpu_te(monkeypatch) -> None:
    """Route every TE spec call in Megatron and in our specs through the CPU stand-in."""
    import megatron.core.models.gpt.gpt_layer_specs as gpt_layer_specs

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", CPUTESpecProvider, raising=False)
    monkeypatch.setattr(specs, "te_spec_provider", CPUTESpecProvider)


def _cfg(*overrides):
    return load_config("tiny", [*SMALL, *overrides])


def _build(cfg, use_te: bool, monkeypatch, init_seed: int = 0):
    with monkeypatch.context() as m:
        m.setattr(builder, "use_transformer_engine", lambda model_cfg, cuda=None: use_te)
        return builder.build_gpt_model(cfg, init_seed=init_seed)


def _checkpoint_keys(model) -> set[str]:
    return {v.key for v in canonical_sharded_state_dict(model).values()}


def test_te_layer_spec_takes_the_norm_from_the_config(monkeypatch):
    """get_gpt_layer_with_transformer_engine_spec has no ``normalization`` parameter."""
    _use_cpu_te(monkeypatch)
    for norm in ("layernorm", "rmsnorm"):
        for split in (True, False):
            cfg = _cfg(f"model.normalization={norm}", f"model.split_qkv={split}")
            spec = specs.build_layer_spec(cfg.model, use_te=True)
            attention = spec.submodules.self_attention.submodules
            if split:
                assert attention.linear_qkv is specs.SplitQKVLinear
                assert spec.submodules.input_layernorm is WrappedTorchNorm
                keys_map = spec.submodules.sharded_state_dict_keys_map
                assert keys_map["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"
            else:
                assert attention.linear_qkv is CPULayerNormColumnParallelLinear


def test_te_and_local_share_one_checkpoint_layout(single_rank, monkeypatch, tmp_path):
    """A checkpoint written by either implementation loads into the other, same function."""
    from megatron.core import dist_checkpointing

    _use_cpu_te(monkeypatch)
    for split, norm in ((True, "layernorm"), (False, "rmsnorm")):
        cfg = _cfg(f"model.split_qkv={split}", f"model.normalization={norm}")
        local = _build(cfg, False, monkeypatch, init_seed=1)
        te = _build(cfg, True, monkeypatch, init_seed=2)
        assert isinstance(te.decoder.layers[0].mlp.linear_fc1, CPULayerNormColumnParallelLinear)
        assert _checkpoint_keys(local) == _checkpoint_keys(te)
        assert not any(is_extra_state_key(k) for k in _checkpoint_keys(local))
        tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(16).expand(2, -1)
        for src, dst, tag in ((local, te, "local_to_te"), (te, local, "te_to_local")):
            ckpt = tmp_path / f"{tag}_{split}_{norm}"
            ckpt.mkdir()
            dist_checkpointing.save({"model": canonical_sharded_state_dict(src)}, str(ckpt))
            wanted = {"model": canonical_sharded_state_dict(dst)}
            loaded = dist_checkpointing.load(wanted, str(ckpt))
            load_canonical_state_dict(dst, loaded["model"])
            with torch.no_grad():
                want = src(tokens, pos, attention_mask=None)
                got = dst(tokens, pos, attention_mask=None)
            # Same weights, same operations in the same order: only the norm's placement
            # differs, so the fp32 results agree to rounding.
            torch.testing.assert_close(got, want)


def test_canonical_load_refuses_missing_parameters(single_rank, monkeypatch):
    cfg = _cfg()
    model = _build(cfg, False, monkeypatch)
    state = {k: v for k, v in model.state_dict().items() if not is_extra_state_key(k)}
    load_canonical_state_dict(model, state)  # _extra_state may be absent
    del state["decoder.final_layernorm.weight"]
    try:
        load_canonical_state_dict(model, state)
    except RuntimeError as exc:
        assert "decoder.final_layernorm.weight" in str(exc)
    else:
        raise AssertionError("a missing parameter was accepted")


def test_meta_build_never_runs_the_te_cpu_initialisation(single_rank, monkeypatch):
    """TE under use_cpu_initialization copies a meta master weight (fails): meta is local."""
    monkeypatch.setattr(builder, "use_transformer_engine", lambda model_cfg, cuda=None: True)
    model = builder.build_gpt_model(_cfg(), meta_device=True)
    assert all(p.is_meta for p in model.parameters())
    assert not isinstance(model.decoder.layers[0].mlp.linear_fc1, CPULayerNormColumnParallelLinear)


def test_select_device_makes_cuda_n_current(monkeypatch):
    from megatron_qk.training import restore

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert restore.select_device("cuda:1") == torch.device("cuda", 1)
    assert restore.select_device("cuda") == torch.device("cuda", 0)
    assert restore.select_device("cpu") == torch.device("cpu")
    assert calls == [1, 0]


def test_analysis_load_selects_the_device_before_building(monkeypatch, tmp_path):
    from megatron_qk.training import restore

    order = []
    cfg = _cfg()
    monkeypatch.setattr(restore, "resolve_checkpoint", lambda path: (tmp_path, tmp_path))
    monkeypatch.setattr(restore, "load_resolved_config", lambda path: cfg)
    monkeypatch.setattr(restore, "ensure_single_process", lambda c: order.append("group"))
    monkeypatch.setattr(restore, "select_device", lambda d: order.append(("device", d)) or d)

    class StopBuildError(Exception):
        pass

    def build(c, device):
        order.append("build")
        raise StopBuildError

    monkeypatch.setattr(restore, "build_initial_model", build)
    try:
        restore.load_checkpoint_for_analysis(tmp_path, device="cuda:1")
    except StopBuildError:
        pass
    assert order == ["group", ("device", "cuda:1"), "build"]


def test_force_param_sync_only_where_the_gather_is_deferred():
    from types import SimpleNamespace

    from megatron_qk.training.checkpoint import force_param_sync

    calls = []

    def chunk(overlap: bool):
        return SimpleNamespace(
            ddp_config=SimpleNamespace(overlap_param_gather=overlap),
            start_param_sync=lambda **kw: calls.append((overlap, kw)),
        )

    assert force_param_sync([chunk(True), chunk(False), torch.nn.Linear(1, 1)]) == 1
    assert calls == [(True, {"force_sync": True})]


def test_speed_flags_on_gpu_only(monkeypatch):
    import importlib.util

    from megatron_qk.models import speed

    assert speed.training_speed_flags(cuda=False) == {}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(speed, "te_available", lambda: True)
    flags = speed.training_speed_flags(cuda=True)
    assert flags == {"gradient_accumulation_fusion": True, "apply_rope_fusion": True}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(speed, "te_available", lambda: False)
    assert speed.training_speed_flags(cuda=True) == {}


def test_cuda_device_max_connections_defaults_to_one():
    from megatron_qk.models.speed import set_cuda_device_max_connections

    env: dict[str, str] = {}
    assert set_cuda_device_max_connections(env) == "1" and env == {
        "CUDA_DEVICE_MAX_CONNECTIONS": "1"
    }
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}
    assert set_cuda_device_max_connections(env) == "8"  # a user's choice is kept
