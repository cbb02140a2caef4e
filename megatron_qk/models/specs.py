"""Megatron-Core layer specs for the paper's architectures (FFN x norm x bias, split Q/K/V).

Everything goes through Megatron's ``ModuleSpec`` seams: the stock local or Transformer Engine
spec is taken as is; the ``linear_qkv`` slot is swapped for :class:`SplitQKVLinear` and the
``core_attention`` class is subclassed to hand post-RoPE Q/K to probes
(:func:`megatron_qk.models.qk_capture.capturing_core_attention`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_qk.config.model import ModelConfig
from megatron_qk.models.qk_capture import capturing_core_attention
from megatron_qk.models.split_qkv import SplitQKVLinear

# Single source of truth for the FFN variants: (gated_linear_unit, activation_func).
# GEGLU is the gated *exact* (erf) GELU, not Megatron's quick_gelu (--quick-geglu).
FFN_TABLE: dict[str, tuple[bool, Callable[[torch.Tensor], torch.Tensor]]] = {
    "gelu": (False, F.gelu),
    "swiglu": (True, F.silu),
    "geglu": (True, F.gelu),
}


def te_available() -> bool:
    """Whether Transformer Engine imports (it is only present on GPU images)."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def target_is_cuda(cuda: bool | None) -> bool:
    """Whether the model will run on CUDA: ``cuda`` when given, else whether this host has it.

    Kernels are chosen for the device a model runs on, not for what the host has installed: a
    CPU-side model on a GPU host (``eval --device cpu``, a checkpoint round trip) must get no
    CUDA-only kernel (apex ``FusedLayerNorm``, Transformer Engine modules).
    """
    return torch.cuda.is_available() if cuda is None else cuda


def use_transformer_engine(model_cfg: ModelConfig, cuda: bool | None = None) -> bool:
    """Resolve ``model.impl`` to TE (True) or the local spec (False).

    Args:
        model_cfg: the recipe's model section.
        cuda: whether the model will run on CUDA (default: whether this host has CUDA).

    Raises:
        ValueError: ``impl: te`` where Transformer Engine or a CUDA target is missing.
    """
    if model_cfg.impl == "local":
        return False
    usable = te_available() and target_is_cuda(cuda)
    if model_cfg.impl == "te" and not usable:
        raise ValueError(
            "model.impl: te needs Transformer Engine and a CUDA device to run on (use the NGC "
            "image, docker/Dockerfile); use impl: auto or local here"
        )
    return usable


# Canonical checkpoint names of the two pre-norms: those of Megatron's TE spec, where the norms
# are fused into ``linear_qkv`` / ``linear_fc1``. The local spec maps its standalone norms to them
# (gpt_layer_specs.py:417-418); the split-Q/K/V TE layer has a standalone input norm again and
# needs the same mapping, so TE and local checkpoints share one key layout.
INPUT_NORM_KEY_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}


def te_spec_provider():
    """Megatron's Transformer Engine backend (modules for norms, linears, attention)."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()


def build_layer_spec(model_cfg: ModelConfig, use_te: bool, cuda: bool | None = None):
    """Transformer layer spec for ``model_cfg`` on the local or TE backend.

    The TE spec takes no ``normalization`` argument: TE modules read LayerNorm vs RMSNorm from
    ``TransformerConfig.normalization`` (the builder sets it from the recipe). The local spec
    takes apex's ``FusedLayerNorm`` wherever apex imports; for a model that will not run on CUDA
    (``cuda`` false, default: whether this host has CUDA) its norms are torch's.
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec

    # QK-norm (model.qk_layernorm) is Megatron's own q_layernorm / k_layernorm slots: the norm
    # runs on each head's query and key inside SelfAttention, before RoPE and before core
    # attention, so the capture below (and every probe) sees the normalised Q/K.
    qk_norm = model_cfg.qk_layernorm
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    else:
        norm = "RMSNorm" if model_cfg.normalization == "rmsnorm" else "LayerNorm"
        spec = get_gpt_layer_local_spec(normalization=norm, qk_layernorm=qk_norm)
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention.submodules
    if not use_te and not target_is_cuda(cuda):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        spec.submodules.input_layernorm = WrappedTorchNorm
        spec.submodules.pre_mlp_layernorm = WrappedTorchNorm
        if qk_norm:  # the local spec's QK norms are apex's FusedLayerNorm where apex imports
            attention.q_layernorm = WrappedTorchNorm
            attention.k_layernorm = WrappedTorchNorm
    # Post-RoPE Q/K reach the diagnostics and the entropy floor through core attention.
    core = attention.core_attention
    if isinstance(core, ModuleSpec):
        core.module = capturing_core_attention(core.module)
    else:
        attention.core_attention = capturing_core_attention(core)
    if not model_cfg.split_qkv:
        return spec
    # Both backends use the same SplitQKVLinear: one GEMM on the re-interleaved weight with
    # Megatron's own TP/SP communication (one all-gather), see docs/TRAPS.md. TE fuses the input
    # norm into linear_qkv (TELayerNormColumnParallelLinear); the split layer needs it standalone.
    attention.linear_qkv = SplitQKVLinear
    if use_te:
        spec.submodules.input_layernorm = te_spec_provider().layer_norm()
        keys_map = dict(spec.submodules.sharded_state_dict_keys_map or {})
        spec.submodules.sharded_state_dict_keys_map = {**keys_map, **INPUT_NORM_KEY_MAP}
    return spec


def final_norm_class(model_cfg: ModelConfig, use_te: bool, cuda: bool | None = None):
    """The final norm of the decoder block.

    Megatron picks TE, else apex ``FusedLayerNorm``, else torch for the final norm regardless of
    ``normalization``; apex's FusedLayerNorm rejects RMSNorm and needs CUDA tensors, so the
    choice is made here, for the device the model runs on (``cuda``, see :func:`target_is_cuda`).
    """
    if use_te:
        return te_spec_provider().layer_norm()
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if model_cfg.normalization == "layernorm":
        try:
            from megatron.core.fusions.fused_layer_norm import HAVE_FUSED_LAYER_NORM, FusedLayerNorm

            if HAVE_FUSED_LAYER_NORM and target_is_cuda(cuda):
                return FusedLayerNorm
        except ImportError:
            pass
    return WrappedTorchNorm


def _layer_seeded_class():
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        get_transformer_layer_offset,
    )

    class LayerSeededTransformerLayer(TransformerLayer):
        """A ``TransformerLayer`` whose weights are drawn from a seed of its global layer number.

        Stock Megatron draws all layers from one running RNG stream, so pipeline stage 2 starts
        from a different state than layer 3 of a one-stage model: PP=2 and PP=1 would train
        different models. Reseeding per layer makes the initial weights independent of the
        pipeline layout and, with the CPU initialisation the builder always uses, of the TP
        layout, which is what lets layouts be compared on the same weights.
        """

        def __init__(self, config, submodules, layer_number: int = 1, *, init_seed: int, **kw):
            offset = get_transformer_layer_offset(config, vp_stage=kw.get("vp_stage"))
            torch.manual_seed(init_seed * 1_000_003 + offset + layer_number)
            super().__init__(config, submodules, layer_number=layer_number, **kw)

    return LayerSeededTransformerLayer


def build_block_spec(
    model_cfg: ModelConfig,
    tf_config,
    use_te: bool,
    vp_stage=None,
    init_seed: int | None = None,
    cuda: bool | None = None,
):
    """``TransformerBlockSubmodules`` for this pipeline stage with an explicit final norm.

    Args:
        init_seed: when given, each layer draws its initial weights from a seed of its global
            layer number, so every TP/PP layout starts from the same model.
        cuda: whether the model will run on CUDA (default: whether this host has CUDA).
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = build_layer_spec(model_cfg, use_te, cuda)
    if init_seed is not None:
        layer = copy.copy(layer)
        layer.module = _layer_seeded_class()
        layer.params = {**(layer.params or {}), "init_seed": init_seed}
    num_layers = get_num_layers_to_build(tf_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * num_layers, layer_norm=final_norm_class(model_cfg, use_te, cuda)
    )
