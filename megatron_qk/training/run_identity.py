"""The trainer's hook into :mod:`megatron_qk.rundir.identity` (one call in the run setup)."""

from __future__ import annotations

from pathlib import Path

from megatron_qk.config.loader import config_to_dict
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.rundir.identity import check_run_identity, recipe_hash, write_identity
from megatron_qk.training.run_dir import RESUME_FREE_KEYS


def claim_run_dir(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Check (when resuming) and record that this user runs this recipe in ``run_dir``.

    Raises:
        ConfigError: the run directory belongs to someone else or to another recipe.
    """
    digest = recipe_hash(config_to_dict(cfg), RESUME_FREE_KEYS | {"training.output_dir"})
    if cfg.training.resume:
        check_run_identity(run_dir, digest)
    write_identity(run_dir, digest)
