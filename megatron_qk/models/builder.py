"""Build Megatron-Core ``TransformerConfig`` and ``GPTModel`` from a recipe."""

from __future__ import annotations

import contextlib

import torch

from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.models.specs import (
    FFN_TABLE,
    build_block_spec,
    target_is_cuda,
    use_transformer_engine,
)


def padded_vocab_size(cfg: ExperimentConfig) -> int:
    """Vocabulary padded to a multiple of ``vocab_pad_multiple * TP`` (Megatron's rule)."""
    multiple = cfg.model.vocab_pad_multiple * cfg.parallel.tensor_model_parallel_size
    return -(-cfg.model.vocab_size // multiple) * multiple


def transformer_config_from(cfg: ExperimentConfig, bf16: bool = False, **overrides):
    """Megatron ``TransformerConfig`` for the recipe's model and parallel layout.

    Weights are initialised as full master weights sliced per TP rank (layout-independent,
    reproducible), on the device the model is built for (:func:`build_gpt_model`). Every fused
    kernel is off: a model built for evaluation or analysis computes the reference function
    with no torch.compile on its first step (``bias_dropout_fusion`` compiles a train and an
    inference function in every process); the trainer turns on what pays for itself on its
    device (``models/speed.py``). ``bias_activation_fusion`` follows the recipe so compared arms
    use the same GELU approximation.

    Args:
        cfg: the recipe.
        bf16: bf16 parameters (fp32 otherwise).
        overrides: ``TransformerConfig`` fields set last.
    """
    from megatron.core.transformer import TransformerConfig

    m, p = cfg.model, cfg.parallel
    gated, activation = FFN_TABLE[m.ffn]
    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        gated_linear_unit=gated,
        activation_func=activation,
        normalization="RMSNorm" if m.normalization == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=m.bias,
        add_qkv_bias=m.bias,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Megatron's "CPU initialisation" path: one full master weight per tensor, drawn from
        # torch's default generator (which the per-layer seeds of
        # specs.LayerSeededTransformerLayer drive), the TP shard sliced from it. Its GPU path
        # draws each shard from the model-parallel RNG tracker (seeded per TP rank): the model
        # would depend on the layout and could not be rebuilt by `diagnose` for the
        # displacement. build_gpt_model runs this path on the target device (GPU draws there).
        use_cpu_initialization=True,
        bias_activation_fusion=m.bias_activation_fusion,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(
    cfg: ExperimentConfig,
    config=None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    meta_device: bool = False,
    init_seed: int | None = None,
    device: torch.device | str | None = None,
):
    """Build this pipeline stage's ``GPTModel`` (RoPE, tied embeddings per the recipe).

    Args:
        cfg: the recipe.
        config: a ``TransformerConfig`` (default: :func:`transformer_config_from` in fp32).
        pre_process / post_process: stage has the embedding / output layer (default: from
            Megatron's parallel state).
        vp_stage: virtual pipeline stage (unused by the presets).
        meta_device: build on the meta device without allocating or initialising weights (for
            parameter counting of large presets).
        init_seed: seed each layer's initial weights by its global layer number, so every
            TP/PP layout builds the same model (the trainer passes ``training.seed``).
        device: the device the model will run on; norms and the TE/local choice follow it
            (default: CUDA when this host has it). A CPU model on a GPU host gets no CUDA-only
            kernel.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if config is None:
        config = transformer_config_from(cfg, perform_initialization=not meta_device)
    elif meta_device:
        config.perform_initialization = False
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    # Meta-device builds use the local spec: TE modules under use_cpu_initialization copy a
    # master weight into their own (transformer_engine.py:853, tensor_parallel/layers.py:189),
    # which fails from meta. The parameter count does not depend on the implementation.
    cuda = target_is_cuda(None if device is None else torch.device(device).type == "cuda")
    use_te = use_transformer_engine(cfg.model, cuda) and not meta_device
    block = build_block_spec(
        cfg.model, config, use_te, vp_stage=vp_stage, init_seed=init_seed, cuda=cuda
    )
    if meta_device:
        ctx = torch.device("meta")
    elif cuda:
        # Initialise where the model will run: Megatron's CPU-initialisation path (one full
        # master weight per tensor, per-layer seeds, the TP shard sliced from it) allocates with
        # the default device, so under this context every master weight is drawn on the GPU
        # by the CUDA generator that LayerSeededTransformerLayer's torch.manual_seed also
        # seeds: still the same model for every TP/PP layout, no host draws (docs/TRAPS.md,
        # "Initial weights depend on the device").
        ctx = torch.device("cuda", torch.cuda.current_device())
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        model = GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=padded_vocab_size(cfg),
            max_sequence_length=cfg.model.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            vp_stage=vp_stage,
        )
    # Where the initial weights were drawn: CUDA and CPU generators give different numbers for
    # the same seed, so `diagnose` rebuilds a run's initialisation on this device type (the
    # checkpoint records it, see training/checkpoint.py).
    model.init_device = "meta" if meta_device else ("cuda" if cuda else "cpu")
    return model
