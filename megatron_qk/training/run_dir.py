"""The run directory contract: config.yaml (resolved + versions + git sha) and summary.json."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.identity import unset_added_keys
from megatron_qk.config.loader import config_to_dict, dump_config
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.rundir.atomic import write_json_atomic, write_text_atomic
from megatron_qk.rundir.config_hash import flatten_config
from megatron_qk.rundir.layout import CONFIG_FILE, SUMMARY_FILE

# Keys that may differ between the first launch of a run and a resume.
RESUME_FREE_KEYS = {
    "training.exit_after_steps",
    "training.resume",
    "training.log_interval",
    # Checkpoint bookkeeping: which steps are kept does not change the trained model.
    "training.save_at_fracs",
    "training.keep_interval_checkpoints",
    "logging.progress_bar",
    "logging.tensorboard",
    "logging.wandb",
    "logging.wandb_project",
    # Observation only: they do not change what is trained.
    "logging.peak_tflops_per_gpu",
    "optim.qk_clip.log_only",
    "training.profile_steps",
    "training.profile_ranks",
    # The parallel layout may change on resume: dist-checkpointing reshards model and optimizer.
    "parallel.tensor_model_parallel_size",
    "parallel.pipeline_model_parallel_size",
    "parallel.sequence_parallel",
    "parallel.overlap_grad_reduce",
    "parallel.overlap_param_gather",
    "parallel.backend",
    "data.check_token_ids",
}


def git_sha() -> str | None:
    """The git commit of the megatron_qk checkout (None outside a git checkout)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def run_metadata(world_size: int) -> dict:
    """Versions, git sha and launch facts recorded in config.yaml under ``_meta``."""
    import megatron.core
    import torch

    import megatron_qk

    meta = {
        "megatron_qk": megatron_qk.__version__,
        "megatron_core": str(megatron.core.__version__),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "world_size": world_size,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "command": " ".join(sys.argv),
    }
    for name in ("transformer_engine", "apex"):
        try:
            module = __import__(name)
            meta[name] = str(getattr(module, "__version__", "installed"))
        except ImportError:
            meta[name] = None
    return meta


def check_resume_compatible(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Refuse to resume a run directory whose recorded config differs from ``cfg``.

    Raises:
        ConfigError: listing the differing keys.
    """
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    saved.pop("_meta", None)
    recipe = config_to_dict(cfg)
    old, new = flatten_config(saved), flatten_config(recipe)
    # A run recorded before a key existed (model.qk_layernorm, optim.qk_clip, ...) has no value
    # for it; the key left at its default here is that same run, not a difference.
    added = {k for k in unset_added_keys(recipe) if k not in old}
    free = RESUME_FREE_KEYS | added
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in free)
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
        raise ConfigError(
            diff[0],
            f"{run_dir} holds a run with a different config ({details}); use another "
            "training.output_dir, or pass --overwrite to move that run aside and start over",
        )


def write_config(run_dir: Path, cfg: ExperimentConfig, world_size: int) -> None:
    """Write ``config.yaml`` atomically."""
    text = dump_config(cfg, extra=run_metadata(world_size))
    write_text_atomic(run_dir / CONFIG_FILE, text)


def write_summary(run_dir: Path, summary: dict) -> None:
    """Write ``summary.json`` atomically."""
    write_json_atomic(run_dir / SUMMARY_FILE, summary, sort_keys=True)
