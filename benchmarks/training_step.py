"""The trainer's optimizer step on any ``GPTModel``, for benchmarks that compare models.

:class:`megatron_qk.training.loop.Trainer` needs megatron-qk's own model (its recorder captures
Q/K in our core attention), so a stock Megatron-Core ``GPTModel`` cannot go through it. This
module wraps a model exactly as ``Trainer.__init__`` does (``Float16Module`` in bf16, Megatron
DDP with fp32 gradient reduction, the recipe's Megatron optimizer with fp32 master weights, the
same Megatron hooks and forward-backward schedule and the trainer's loss function), so both
models in a comparison run the step training runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stock_gpt_model(cfg, config, use_te: bool):
    """Megatron-Core's own ``GPTModel`` with its stock layer spec (fused ``linear_qkv``)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron_qk.models.builder import padded_vocab_size

    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()  # norm from config.normalization
    else:
        norm = "RMSNorm" if cfg.model.normalization == "rmsnorm" else "LayerNorm"
        spec = get_gpt_layer_local_spec(normalization=norm)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(cfg),
        max_sequence_length=cfg.model.seq_length,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
    )


def training_step(
    cfg, model: torch.nn.Module, tf_config, micro_batch: int, device: torch.device
) -> Callable[[], tuple[float, float]]:
    """Wrap ``model`` as the trainer does and return ``step() -> (seconds, loss)``.

    ``tf_config`` must be this model's own ``TransformerConfig`` (the hooks are set on it).
    One step is one micro-batch of fixed random tokens through Megatron's schedule, the
    gradient reduction and ``optimizer.step()``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_qk.models.params import annotate_param_roles
    from megatron_qk.optim.param_groups import build_optimizer
    from megatron_qk.training.losses import token_loss
    from megatron_qk.training.wrapping import attach_schedule_hooks, wrap_for_training

    annotate_param_roles(model)
    model = model.to(device)
    ddp = wrap_for_training(cfg, tf_config, model, tf_config.bf16)
    optimizer, _ = build_optimizer(cfg, [ddp])
    attach_schedule_hooks(cfg, tf_config, ddp, optimizer)
    forward_backward = get_forward_backward_func()

    g = torch.Generator().manual_seed(0)
    shape = (micro_batch, cfg.model.seq_length)
    batch = {
        "tokens": torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device),
        "labels": torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device),
        "loss_mask": torch.ones(shape, device=device),
        "position_ids": torch.arange(shape[1], device=device).expand(micro_batch, -1),
    }

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], attention_mask=None, labels=b["labels"])
        return out, lambda output: token_loss(b["loss_mask"], output)

    def step() -> tuple[float, float]:
        _sync()
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=ddp,
            num_microbatches=1,
            seq_length=cfg.model.seq_length,
            micro_batch_size=micro_batch,
            forward_only=False,
        )
        optimizer.step()
        _sync()
        elapsed = time.perf_counter() - start
        report = losses[0]["lm loss"]
        return elapsed, float(report[0] / report[1])

    return step
