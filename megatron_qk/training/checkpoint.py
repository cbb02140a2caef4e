"""Checkpoint save/load with Megatron distributed checkpointing.

Layout under ``<output_dir>/checkpoints`` (names in :mod:`megatron_qk.rundir.layout`)::

    iter_0000100/            dist_checkpointing dir: model + optimizer (sharded, any TP/PP/DP)
    iter_0000100/train_state.pt   step, consumed samples, scheduler + release-controller state,
                             the model settings that shape the weights
    iter_0000100/rng_rank{R}.pt   per-rank RNG states (python, numpy, torch, Megatron tracker)
    latest                   text: the name of the newest complete checkpoint

A checkpoint is written to ``iter_X.tmp`` and renamed once every rank has finished; ``latest`` is
replaced atomically after that, so an interrupted save never becomes the resume point.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_qk.models.checkpoint_layout import (
    canonical_sharded_state_dict,
    load_canonical_state_dict,
)
from megatron_qk.rundir.atomic import write_text_atomic
from megatron_qk.rundir.layout import (
    LATEST_FILE,
    TRAIN_STATE_FILE,
    checkpoint_name,
    is_checkpoint,
    latest_checkpoint,
    rng_file_name,
)
from megatron_qk.training.checkpoint_settings import check_model_settings, shape_mismatch_error
from megatron_qk.training.resume_layout import (
    capture_rng_state,
    check_padded_vocab,
    current_layout,
    load_optimizer_state,
    prepare_optimizer_for_load,
    restore_or_reseed_rng,
)
from megatron_qk.training.safe_load import (
    check_dist_checkpoint,
    check_extra_states,
    load_state_file,
)
from megatron_qk.training.save_errors import CheckpointSaveError, save_failure_message

logger = logging.getLogger(__name__)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


# The distributed optimizer's default format ('fully_sharded_model_space') stores flattened
# ranges, which Megatron-Core 0.16.1's own loader rejects; 'fully_reshardable' writes the
# canonical per-parameter state, so a run can also resume under a different DP size.
OPTIMIZER_CKPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_sharded_state_dict(model_chunks: list) -> dict:
    # Keys come from the bare model so checkpoints do not depend on the wrappers in use
    # (DDP, Float16Module for bf16) and load into any of them.
    # The canonical layout (no _extra_state) is shared by the TE and local implementations.
    bare = [unwrap_model(m) for m in model_chunks]
    if len(bare) == 1:
        return {"model": canonical_sharded_state_dict(bare[0])}
    return {f"model{i}": canonical_sharded_state_dict(m) for i, m in enumerate(bare)}


def force_param_sync(model_chunks: list) -> int:
    """All-gather updated parameters now on chunks that defer it (``overlap_param_gather``).

    With ``overlap_param_gather`` the distributed optimizer skips the all-gather at step time
    (distrib_optimizer.py:2617) and the next forward pre-hook runs it, so a save right after
    ``optimizer.step()`` would write stale weights. Megatron-LM forces the sync before saving.

    Returns:
        How many chunks were synchronised.
    """
    synced = 0
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)
            synced += 1
    return synced


@dataclass
class TrainState:
    """The scalar part of a checkpoint."""

    step: int
    consumed_samples: int
    scheduler: dict
    extra: dict
    # checkpoint_settings.model_settings of the model (None: not recorded, older checkpoints).
    model_settings: dict | None = None


def save_checkpoint(
    ckpt_root: Path,
    model_chunks: list,
    optimizer,
    state: TrainState,
) -> Path:
    """Save a checkpoint (collective: every rank must call it).

    Returns:
        The final checkpoint directory.
    """

    name = checkpoint_name(state.step)
    final = ckpt_root / name
    tmp = ckpt_root / f"{name}.tmp"
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an interrupted save
        tmp.mkdir()
    _barrier()
    force_param_sync(model_chunks)
    sharded = _model_sharded_state_dict(model_chunks)
    sharded["optimizer"] = optimizer.sharded_state_dict(
        sharded, is_loading=False, metadata=OPTIMIZER_CKPT_METADATA
    )
    try:
        _write_checkpoint_files(sharded, tmp, model_chunks, state)
    except (OSError, RuntimeError) as exc:
        message = save_failure_message(tmp, latest_checkpoint(ckpt_root), exc)
        raise CheckpointSaveError(message) from exc
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(ckpt_root / LATEST_FILE, name + "\n")
    _barrier()
    return final


def _write_checkpoint_files(sharded: dict, tmp: Path, model_chunks: list, state: TrainState):
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded, str(tmp))
    torch.save(capture_rng_state(), tmp / rng_file_name(_rank()))
    if _rank() == 0:
        torch.save(
            {
                "step": state.step,
                "consumed_samples": state.consumed_samples,
                "scheduler": state.scheduler,
                "extra": state.extra,
                "layout": current_layout(),
                "padded_vocab": getattr(unwrap_model(model_chunks[0]), "vocab_size", None),
                "model_settings": state.model_settings,
                # The device type the run's initial weights were drawn on (models/builder.py).
                "init_device": getattr(unwrap_model(model_chunks[0]), "init_device", None),
            },
            tmp / TRAIN_STATE_FILE,
        )


def load_checkpoint(
    path: Path,
    model_chunks: list,
    optimizer=None,
    restore_rng: bool = True,
    seed: int = 0,
    expected_model: dict | None = None,
    source: str = "this run's recipe",
) -> TrainState:
    """Load model (and optimizer, RNG) state from ``path`` in place (collective).

    Args:
        path: a checkpoint directory written by :func:`save_checkpoint`.
        model_chunks: the (DDP-wrapped or bare) model chunks, built with the same config.
        optimizer: the Megatron optimizer, or None to load weights only (diagnose/eval).
        restore_rng: restore this rank's RNG states when the layout is the saved one, else
            re-seed deterministically from ``seed`` and the step (with a warning).
        seed: the recipe's ``training.seed`` (for that re-seed).
        expected_model: :func:`~megatron_qk.training.checkpoint_settings.model_settings` of the
            recipe the model was built from, compared with the checkpoint's before loading.
        source: where that recipe comes from, for the error ("this run's config.yaml").

    Returns:
        The scalar train state; the caller restores the scheduler from ``state.scheduler``.

    Raises:
        CheckpointMismatchError: the checkpoint was trained with other model settings (names the
            first that differs).
    """
    from megatron.core import dist_checkpointing

    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a megatron-qk checkpoint (no {TRAIN_STATE_FILE})")

    raw = load_state_file(path / TRAIN_STATE_FILE)
    check_model_settings(path, raw.get("model_settings"), expected_model, source)
    check_padded_vocab(
        path, raw.get("padded_vocab"), getattr(unwrap_model(model_chunks[0]), "vocab_size", None)
    )
    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        prepare_optimizer_for_load(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=OPTIMIZER_CKPT_METADATA
        )
    check_dist_checkpoint(path)  # before Megatron's loader unpickles anything from it
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except BaseException as exc:  # torch DCP wraps Megatron's error in a BaseException
        mismatch = shape_mismatch_error(path, source, exc)
        if mismatch is None:
            raise
        raise mismatch from exc
    check_extra_states(loaded, path)  # before TE's set_extra_state could unpickle any of it
    bare = [unwrap_model(m) for m in model_chunks]
    if len(bare) == 1:
        load_canonical_state_dict(bare[0], loaded["model"])
    else:
        for i, m in enumerate(bare):
            load_canonical_state_dict(m, loaded[f"model{i}"])
    for m in bare:  # the weights now come from that run's initialisation (older ones: CPU)
        m.init_device = raw.get("init_device") or "cpu"
    if optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"])
    if restore_rng:
        restore_or_reseed_rng(path, raw.get("layout"), seed, raw["step"], _rank())
    return TrainState(
        raw["step"],
        raw["consumed_samples"],
        raw["scheduler"],
        raw["extra"],
        raw.get("model_settings"),
    )
