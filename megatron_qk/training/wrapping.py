"""Wrap a built model for training exactly as the trainer does (one place for the trainer and
the step-time benchmark, so the benchmark times the real training step)."""

from __future__ import annotations

import torch


def wrap_for_training(cfg, tf_config, model: torch.nn.Module, bf16: bool):
    """Float16Module (bf16) and Megatron's DDP around ``model``, configured from ``cfg.parallel``.

    Args:
        cfg: the experiment config.
        tf_config: the model's own ``TransformerConfig``.
        model: the bare model, already on its device.
        bf16: wrap in ``Float16Module`` (bf16 compute, fp32 master weights in the optimizer).

    Returns:
        The ``DistributedDataParallel`` module.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tf_config, model)
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return DistributedDataParallel(config=tf_config, ddp_config=ddp_config, module=model)


def attach_schedule_hooks(cfg, tf_config, ddp, optimizer) -> None:
    """Set the hooks Megatron's schedules call (Megatron-LM's training.py sets the same ones)."""
    from megatron.core.distributed import finalize_model_grads

    tf_config.no_sync_func = ddp.no_sync
    tf_config.finalize_model_grads_func = finalize_model_grads
    tf_config.grad_scale_func = optimizer.scale_loss
    if cfg.parallel.overlap_param_gather:
        tf_config.param_sync_func = ddp.start_param_sync
