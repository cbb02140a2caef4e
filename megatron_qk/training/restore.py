"""Load a trained model from a checkpoint for analysis in one process (diagnose, eval).

Checkpoints are Megatron distributed checkpoints, so a run trained with any TP/PP/DP layout
loads here into a single unsharded ``GPTModel`` (TP = PP = 1). The recipe comes from the run
directory's ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_qk.config.loader import load_resolved_config
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.models.params import annotate_param_roles
from megatron_qk.rundir.layout import CONFIG_FILE, resolve_checkpoint
from megatron_qk.training.checkpoint import load_checkpoint
from megatron_qk.training.checkpoint_settings import model_settings
from megatron_qk.training.distributed import setup_distributed


@dataclass
class LoadedCheckpoint:
    """A model restored from a checkpoint, with the recipe that trained it."""

    cfg: ExperimentConfig  # the run's recipe, layout reset to one process
    model: torch.nn.Module  # bare GPTModel in eval mode
    step: int
    checkpoint: Path
    run_dir: Path
    device: torch.device


def single_process_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same recipe laid out on one process (TP = PP = 1, no sequence parallelism)."""
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(
            cfg.parallel,
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
            sequence_parallel=False,
        ),
    )


def ensure_single_process(cfg: ExperimentConfig) -> None:
    """Start a one-process group and Megatron state unless one with TP = PP = 1 is running."""
    if not torch.distributed.is_initialized():
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            os.environ.pop(key, None)
    setup_distributed(cfg)


def build_initial_model(cfg: ExperimentConfig, device: torch.device) -> torch.nn.Module:
    """The run's model at initialisation (per-layer seeds make it layout-independent)."""
    # Lazy: the builder imports megatron-core (seconds), which only a model build needs.
    from megatron_qk.models.builder import build_gpt_model, transformer_config_from

    config = transformer_config_from(cfg)
    model = build_gpt_model(cfg, config=config, init_seed=cfg.training.seed, device=device)
    return model.to(device).eval()


def load_checkpoint_for_analysis(
    path: str | Path, device: torch.device | None = None
) -> LoadedCheckpoint:
    """Restore a checkpoint's weights into a one-process fp32 model.

    Args:
        path: see :func:`megatron_qk.rundir.layout.resolve_checkpoint`.
        device: where to put the model (default: CUDA when available, else CPU).

    Raises:
        CheckpointMismatchError: the checkpoint was trained with other model settings than its
            run directory's ``config.yaml`` (names the first that differs).
    """
    ckpt, run_dir = resolve_checkpoint(path)
    cfg = single_process_config(load_resolved_config(run_dir / CONFIG_FILE))
    ensure_single_process(cfg)
    # After the process group (setup_distributed selects LOCAL_RANK's GPU), before the build.
    device = select_device(device)
    model = build_initial_model(cfg, device)
    annotate_param_roles(model)
    state = load_checkpoint(
        ckpt,
        [model],
        optimizer=None,
        restore_rng=False,
        expected_model=model_settings(cfg.model),
        source=f"this run's config.yaml ({run_dir / CONFIG_FILE})",
    )
    return LoadedCheckpoint(cfg, model.eval(), state.step, ckpt, run_dir, device)


def reload_weights(loaded: LoadedCheckpoint, path: Path) -> LoadedCheckpoint:
    """Load another checkpoint of the same run into ``loaded.model`` (no rebuild)."""
    state = load_checkpoint(
        path,
        [loaded.model],
        optimizer=None,
        restore_rng=False,
        expected_model=model_settings(loaded.cfg.model),
        source=f"this run's config.yaml ({loaded.run_dir / CONFIG_FILE})",
    )
    loaded.model.eval()
    return dataclasses.replace(loaded, step=state.step, checkpoint=path)


def select_device(device: torch.device | str | None = None) -> torch.device:
    """Resolve ``device`` (default: CUDA when available, else CPU) and make it current.

    Megatron places tensors on ``torch.cuda.current_device()`` rather than on the module's
    device (RoPE's ``inv_freq``, rotary_pos_embedding.py:161-162), so a model meant for
    ``cuda:N`` must be built and run with ``cuda:N`` as the current device.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    return device
