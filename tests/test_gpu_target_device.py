"""Kernels follow the device a model runs on, not what the host has installed.

On an NGC host apex and Transformer Engine import and CUDA is present; a model built there for
the CPU (``eval``/``diagnose --device cpu``, the CPU side of ``gpu_check``'s checkpoint round
trip) must still get torch norms and the local spec: apex ``FusedLayerNorm`` and TE modules
need CUDA tensors. The tests pretend to be that host on the CPU: CUDA "available", TE
"importable", apex's ``FusedLayerNorm`` chosen by Megatron's local spec.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_qk.config.loader import load_config
from megatron_qk.models import builder, specs


@pytest.fixture
def ngc_host(monkeypatch):
    """CUDA present, TE importable, apex's FusedLayerNorm picked by Megatron's local spec."""
    import megatron.core.fusions.fused_layer_norm as fused_layer_norm
    import megatron.core.models.backends as backends
    import megatron.core.models.gpt.gpt_layer_specs as gpt_layer_specs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(specs, "te_available", lambda: True)
    monkeypatch.setattr(fused_layer_norm, "HAVE_FUSED_LAYER_NORM", True)
    monkeypatch.setattr(backends, "LNImpl", FusedLayerNorm)
    monkeypatch.setattr(gpt_layer_specs, "LNImpl", FusedLayerNorm, raising=False)


def _norm_classes(block) -> set[type]:
    layer = block.layer_specs[0].submodules
    return {layer.input_layernorm, layer.pre_mlp_layernorm, block.layer_norm}


def test_cpu_target_on_a_gpu_host_gets_no_cuda_only_kernel(single_rank, ngc_host):
    cfg = load_config("tiny", ["model.normalization=layernorm"])
    assert specs.use_transformer_engine(cfg.model, cuda=False) is False
    config = builder.transformer_config_from(cfg)
    block = specs.build_block_spec(cfg.model, config, use_te=False, cuda=False)
    assert _norm_classes(block) == {WrappedTorchNorm}
    assert config.bias_dropout_fusion is False  # no torch.compile on an evaluation model


def test_cuda_target_keeps_the_hosts_fused_kernels(single_rank, ngc_host):
    """The control: the same host building for CUDA still gets TE and apex's fused norm."""
    cfg = load_config("tiny", ["model.normalization=layernorm", "model.impl=auto"])
    assert specs.use_transformer_engine(cfg.model, cuda=True) is True
    config = builder.transformer_config_from(cfg)
    block = specs.build_block_spec(cfg.model, config, use_te=False, cuda=True)
    assert FusedLayerNorm in _norm_classes(block)


def test_impl_te_for_a_cpu_model_is_refused(ngc_host):
    cfg = load_config("tiny", ["model.impl=te"])
    with pytest.raises(ValueError, match="CUDA device to run on"):
        specs.use_transformer_engine(cfg.model, cuda=False)


def test_initial_model_for_the_cpu_builds_and_runs_on_a_gpu_host(single_rank, ngc_host):
    """What ``diagnose --device cpu`` builds: before, apex's FusedLayerNorm (CUDA only)."""
    from megatron_qk.training.restore import build_initial_model

    cfg = load_config("tiny", ["model.normalization=layernorm", "model.vocab_size=64"])
    model = build_initial_model(cfg, torch.device("cpu"))
    kinds = {type(m) for m in model.modules()}
    assert FusedLayerNorm not in kinds and torch.nn.LayerNorm in kinds  # WrappedTorchNorm builds it
    tokens = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        out = model(tokens, torch.arange(8).unsqueeze(0), attention_mask=None)
    assert torch.isfinite(out).all()
