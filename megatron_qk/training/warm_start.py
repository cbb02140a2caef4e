"""``training.init_checkpoint``: start a run from another run's weights (weights only).

Like torchtitan's ``checkpoint.initial_load_path`` and nanoGPT's ``init_from``: the model's
weights come from the checkpoint, everything else is this run's own start (a fresh optimizer
with no moments, step 0, the data from its first sample, the lr schedule from its warm-up). The
checkpoint's recorded model settings are compared with the recipe's first
(:mod:`~megatron_qk.training.checkpoint_settings`), so a checkpoint of another recipe is named,
not loaded. Any layout loads: checkpoints are layout-independent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_qk.config.errors import ConfigError
from megatron_qk.rundir.layout import resolve_checkpoint
from megatron_qk.training import checkpoint as ckpt
from megatron_qk.training.checkpoint_settings import model_settings

if TYPE_CHECKING:
    from megatron_qk.training.loop import Trainer

SOURCE = "this run's recipe (training.init_checkpoint)"


def load_initial_weights(trainer: Trainer) -> str:
    """Load ``training.init_checkpoint``'s weights into ``trainer``'s model (collective).

    The optimizer's fp32 main parameters (bf16 runs, the distributed optimizer) are refreshed
    from the loaded weights; the optimizer state itself stays empty.

    Returns:
        The line to announce.

    Raises:
        ConfigError: ``training.init_checkpoint`` names no checkpoint, or one of another recipe
            (:class:`~megatron_qk.training.checkpoint_settings.CheckpointMismatchError`).
    """
    value = trainer.cfg.training.init_checkpoint
    try:
        path, _ = resolve_checkpoint(value)
    except FileNotFoundError as exc:
        raise ConfigError("training.init_checkpoint", str(exc)) from None
    state = ckpt.load_checkpoint(
        path,
        trainer.model_chunks,
        optimizer=None,
        restore_rng=False,
        expected_model=model_settings(trainer.cfg.model),
        source=SOURCE,
    )
    trainer.optimizer.reload_model_params()
    if trainer.cfg.diagnostics.enabled:
        # The Q/K drift of this run is measured from the weights it starts from.
        trainer.recorder.snapshot_initial_qk()
    return (
        f"initialised the weights from {path} (step {state.step} of that run); optimizer, "
        "step and data start fresh"
    )
