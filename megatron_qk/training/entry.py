"""Process-level entry points: train a config, or dry-run it (build + parameter counts)."""

from __future__ import annotations

import logging
import sys

from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.training.distributed import setup_distributed, teardown_distributed

logger = logging.getLogger(__name__)


def train_from_config(cfg: ExperimentConfig) -> dict | None:
    """Train (or resume) one run in this process group member.

    Returns:
        The run summary on the logging rank, None on other ranks.
    """
    from megatron_qk.training.loop import NonFiniteLossError, Trainer

    info = setup_distributed(cfg)
    try:
        trainer = Trainer(cfg, info)
        try:
            summary = trainer.run()
        except NonFiniteLossError as exc:
            if info.is_logging_rank:
                print(f"megatron-qk train: {exc}", file=sys.stderr)
            raise SystemExit(3) from None
        return summary if info.is_logging_rank else None
    finally:
        teardown_distributed()


def dry_run(cfg: ExperimentConfig) -> dict:
    """Build the model as one process (TP = PP = 1, meta device) and count its parameters.

    The parameter count does not depend on the parallel layout, so a laptop can check a recipe
    meant for a cluster. The layout itself was validated by the caller.
    """

    from megatron_qk.models.builder import build_gpt_model, padded_vocab_size
    from megatron_qk.models.params import count_parameters, expected_parameter_count
    from megatron_qk.training.checkpoint_plan import end_step, planned_checkpoint_steps
    from megatron_qk.training.restore import single_process_config

    single = single_process_config(cfg)
    import os

    saved = {k: os.environ.pop(k, None) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    setup_distributed(single)
    try:
        model = build_gpt_model(single, meta_device=True)
        counts = count_parameters(model)
        expected = expected_parameter_count(single.model, padded_vocab_size(single))
    finally:
        teardown_distributed()
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v
    return {
        "name": cfg.name,
        "parameters": counts,
        "expected_parameters": expected,
        "planned_steps": cfg.planned_steps(),
        "planned_tokens": cfg.planned_steps()
        * cfg.training.global_batch_size
        * cfg.model.seq_length,
        # Every step an uninterrupted run saves a checkpoint at (interval, save_at_fracs, end).
        "checkpoint_steps": planned_checkpoint_steps(cfg),
        "end_step": end_step(cfg),
        "layout": {
            "tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
            "pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size,
        },
    }
