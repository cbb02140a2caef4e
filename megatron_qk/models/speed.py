"""GPU speed settings for training: fused kernels Megatron-Core offers where they are valid.

The builder's defaults keep every fused kernel off, so a model built for evaluation or analysis
(no DDP, possibly on CPU) computes the reference function. The trainer adds these overrides.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from megatron_qk.models.specs import te_available

#: Megatron's linear layers warn without it under sequence parallelism or async all-reduce
#: (tensor_parallel/layers.py:728-745): kernels must reach the GPU in issue order so the
#: communication overlaps the GEMMs.
CUDA_DEVICE_MAX_CONNECTIONS = "1"


def training_speed_flags(cuda: bool | None = None, hidden_dropout: float = 0.0) -> dict[str, bool]:
    """``TransformerConfig`` overrides for training on this host.

    * ``gradient_accumulation_fusion``: the weight-gradient GEMM accumulates straight into DDP's
      fp32 ``main_grad`` (needs apex's ``fused_weight_gradient_mlp_cuda``, which
      ``ColumnParallelLinear`` requires at construction, and the DDP wrapper the trainer uses).
    * ``apply_rope_fusion``: Transformer Engine's fused RoPE kernel (Q/K reach the probes after
      RoPE either way: capture sits in core attention).
    * ``bias_dropout_fusion`` only with dropout (``hidden_dropout > 0``): Megatron compiles the
      fused bias-dropout-add with ``torch.compile``, once for training and once for evaluation,
      in every process, on its first step. Without dropout the function is two additions,
      which the compile cannot make meaningfully cheaper.

    Args:
        cuda: whether training runs on CUDA (default: ``torch.cuda.is_available()``).
        hidden_dropout: the recipe's ``model.hidden_dropout``.
    """
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        return {}
    flags = {}
    if importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None:
        flags["gradient_accumulation_fusion"] = True
    if te_available():
        flags["apply_rope_fusion"] = True
    if hidden_dropout > 0:
        flags["bias_dropout_fusion"] = True
    return flags


def set_cuda_device_max_connections(env: dict | None = None) -> str:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` in ``env`` (default ``os.environ``) unless set.

    Torchrun's workers inherit the launcher's environment, so calling this before launching
    covers every training process. Returns the value now in effect.
    """
    env = os.environ if env is None else env
    return env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", CUDA_DEVICE_MAX_CONNECTIONS)
