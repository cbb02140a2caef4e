"""Process-level entry points: train a config, or dry-run it (build + parameter counts)."""

from __future__ import annotations

import logging
import os
import sys

from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.models.builder import build_gpt_model, padded_vocab_size
from megatron_qk.models.params import count_parameters, expected_parameter_count
from megatron_qk.models.specs import build_layer_spec, use_transformer_engine
from megatron_qk.rundir.lock import RunDirLock
from megatron_qk.rundir.previous import holds_run, move_run_aside
from megatron_qk.training.callbacks.hold import hold_from_env
from megatron_qk.training.callbacks.preemption import StopOnPreemption
from megatron_qk.training.checkpoint_plan import end_step, planned_checkpoint_steps
from megatron_qk.training.child_processes import make_forked_children_die_with_parent
from megatron_qk.training.distributed import (
    setup_distributed,
    teardown_distributed,
    world_size_from_env,
)
from megatron_qk.training.eval_plan import evaluation_steps
from megatron_qk.training.loop import NonFiniteLossError, Trainer
from megatron_qk.training.preemption import PreemptedError, PreemptionWatch
from megatron_qk.training.preflight import preflight
from megatron_qk.training.restore import single_process_config
from megatron_qk.training.save_errors import CheckpointSaveError

logger = logging.getLogger(__name__)


def _env_rank(name: str) -> int:
    return int(os.environ.get(name, "0"))


def train_from_config(cfg: ExperimentConfig, overwrite: bool = False) -> dict | None:
    """Train (or resume) one run in this process group member.

    Before the model is built: the preflight checks (:mod:`~megatron_qk.training.preflight`),
    then global rank 0 takes the run directory's lock for the life of the training and, with
    ``overwrite``, moves an earlier run aside to ``RUN_DIR.prev-<timestamp>``.

    Args:
        cfg: the recipe.
        overwrite: start over in a directory holding an earlier run by moving that run aside.

    Returns:
        The run summary on the logging rank, None on other ranks.

    Raises:
        PreflightError: a recipe problem found before the build (names the key).
        RunDirBusyError: another training holds the run directory (names host and pid).
        SystemExit: 3 on a non-finite loss, 4 when a checkpoint cannot be written, 75
            (``PREEMPTED_EXIT_CODE``) when stopped by SIGTERM/SIGUSR1 after saving a checkpoint,
            130 (``INTERRUPTED_EXIT_CODE``) when stopped by a Ctrl-C after saving one.
    """
    rank0 = _env_rank("RANK") == 0
    preflight(cfg, world_size_from_env(), overwrite=overwrite, scan_tokens=rank0, run_dir=rank0)
    lock = RunDirLock(cfg.training.output_dir) if rank0 else None
    watch = PreemptionWatch()
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None and overwrite and holds_run(lock.run_dir):
            moved = move_run_aside(lock.run_dir)
            print(f"megatron-qk train: moved the earlier run to {moved}", file=sys.stderr)
        make_forked_children_die_with_parent()
        watch.install()
        info = setup_distributed(cfg)
        try:
            trainer = Trainer(cfg, info)
            hold = hold_from_env(watch)  # fault injection for the signal tests; None otherwise
            if hold is not None:
                trainer.add_callback(hold)
            trainer.add_callback(StopOnPreemption(watch))
            try:
                summary = trainer.run()
            except NonFiniteLossError as exc:
                if info.is_logging_rank:
                    print(f"megatron-qk train: {exc}", file=sys.stderr)
                raise SystemExit(3) from None
            except CheckpointSaveError as exc:
                if info.is_logging_rank:
                    print(f"megatron-qk train: {exc}", file=sys.stderr)
                raise SystemExit(4) from None
            except PreemptedError as exc:
                if info.is_logging_rank:
                    print(f"megatron-qk train: {exc}", file=sys.stderr)
                raise SystemExit(exc.exit_code) from None
            return summary if info.is_logging_rank else None
        finally:
            teardown_distributed()
    finally:
        watch.uninstall()
        if lock is not None:
            lock.release()


def dry_run(cfg: ExperimentConfig) -> dict:
    """Build the model as one process (TP = PP = 1, meta device) and count its parameters.

    The parameter count does not depend on the parallel layout, so a laptop can check a recipe
    meant for a cluster. The layout itself was validated by the caller.
    """

    single = single_process_config(cfg)
    saved = {k: os.environ.pop(k, None) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    setup_distributed(single)
    try:
        if use_transformer_engine(single.model):
            # The meta build below uses the local spec; the TE spec is still built (no modules,
            # no allocation), so a wrong call into the TE spec fails here, before torchrun.
            build_layer_spec(single.model, use_te=True)
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
        "planned_tokens": cfg.planned_steps() * cfg.tokens_per_step(),
        # Every step an uninterrupted run saves a checkpoint at (interval, save_at_fracs, end).
        "checkpoint_steps": planned_checkpoint_steps(cfg),
        # Every step an uninterrupted run evaluates at (and reads its diagnostics at).
        "evaluation_steps": evaluation_steps(cfg),
        "end_step": end_step(cfg),
        "layout": {
            "tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
            "pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size,
        },
    }
