"""The run directory around a training: claimed at the start, metrics reset, sinks opened.

:meth:`megatron_qk.training.loop.Trainer.run` calls these in order: :func:`claim` before the
checkpoint is looked for, :func:`finished_summary` when the resumed run is already complete,
:func:`start_metrics` once the resume point is known, then :func:`open_sinks` and
:func:`open_progress_bar` and :func:`open_step_log`. Only the logging rank writes; the
functions are no-ops elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_qk.config.loader import config_to_dict
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.training.console import StepLog
from megatron_qk.training.distributed import ParallelInfo
from megatron_qk.training.run_dir import check_resume_compatible, write_config
from megatron_qk.training.run_identity import claim_run_dir
from megatron_qk.training.sinks import MetricsSinks, ProgressBar, truncate_metrics


def claim(cfg: ExperimentConfig, info: ParallelInfo, run_dir: Path) -> None:
    """Create the run directory, check a resume is of the same recipe, claim it (collective).

    Raises:
        ConfigError: when ``training.resume`` finds a run of another recipe there.
    """
    if info.is_logging_rank:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if cfg.training.resume:
            check_resume_compatible(run_dir, cfg)
        claim_run_dir(run_dir, cfg)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def finished_summary(run_dir: Path) -> dict | None:
    """The summary of a run that already finished (``summary.json``), else None."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def start_metrics(cfg: ExperimentConfig, info: ParallelInfo, run_dir: Path, resumed_at: int | None):
    """Cut ``metrics.jsonl`` back to the resume point (or remove it) and write ``config.yaml``.

    Args:
        cfg: the recipe.
        info: this process's place in the layout.
        run_dir: the run directory.
        resumed_at: the step of the checkpoint resumed from; None on a fresh start, which
            replaces the lines of an earlier run.
    """
    if not info.is_logging_rank:
        return
    metrics = run_dir / "metrics.jsonl"
    if resumed_at is not None:
        truncate_metrics(metrics, resumed_at)
    elif metrics.exists():
        metrics.unlink()
    write_config(run_dir, cfg, info.world_size)


def open_sinks(cfg: ExperimentConfig, info: ParallelInfo, run_dir: Path) -> MetricsSinks:
    """metrics.jsonl plus the TensorBoard and W&B sinks the recipe asks for."""
    return MetricsSinks(
        run_dir,
        enabled=info.is_logging_rank,
        tensorboard=cfg.logging.tensorboard,
        wandb_mode=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project,
        run_name=f"{cfg.name}-{cfg.arm}-s{cfg.training.seed}",
        config_dict=config_to_dict(cfg),
    )


def open_progress_bar(
    cfg: ExperimentConfig, info: ParallelInfo, planned_steps: int, step: int
) -> ProgressBar:
    """The logging rank's progress bar (log lines instead when ``logging.progress_bar`` is off)."""
    return ProgressBar(
        info.is_logging_rank and cfg.logging.progress_bar,
        total=planned_steps,
        initial=step,
        desc=f"{cfg.name}/{cfg.arm}",
        log_lines=info.is_logging_rank,
    )


def open_step_log(cfg: ExperimentConfig, info: ParallelInfo, end_step: int, step: int) -> StepLog:
    """The logging rank's per-interval console line, printed when the bar is off or stderr is
    not a terminal (a SLURM log)."""
    return StepLog(
        info.is_logging_rank and StepLog.wanted(cfg.logging.progress_bar),
        total=cfg.planned_steps(),
        end_step=end_step,
        start_step=step,
    )
