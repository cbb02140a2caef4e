"""The model settings a checkpoint records, checked against a recipe before any weight is read.

A checkpoint of another recipe (copied into a run directory, or named by
``training.init_checkpoint``) used to fail deep inside Megatron's distributed-checkpoint loader
with a "Global shape mismatch" traceback. Every checkpoint now records the settings that shape
its weights (``model_settings`` in ``train_state.pt``); :func:`check_model_settings` names the
first one that differs ("checkpoint iter_0000020 has hidden_size 128, this run's config.yaml
says 64"). Checkpoints written before the record existed are checked by the loader's shape
comparison, whose error :func:`shape_mismatch_error` rewrites the same way.
"""

from __future__ import annotations

from pathlib import Path

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.model import ModelConfig

# The model keys that decide a weight's shape or name (the rest, e.g. dropout, init std,
# fusion or the TE/local implementation, load into any value).
SHAPE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn",
    "ffn_hidden_size",
    "normalization",
    "bias",
    "vocab_size",
    "vocab_pad_multiple",
    "tie_embeddings",
    "split_qkv",
    "qk_layernorm",
)


class CheckpointMismatchError(ConfigError):
    """A checkpoint was trained with model settings other than the recipe's."""


def model_settings(model: ModelConfig) -> dict:
    """The settings of ``model`` recorded in (and compared with) a checkpoint."""
    return {key: getattr(model, key) for key in SHAPE_KEYS}


def check_model_settings(
    checkpoint: Path, recorded: dict | None, expected: dict | None, source: str
) -> None:
    """Raise naming the first of :data:`SHAPE_KEYS` that differs between the two.

    Args:
        checkpoint: the checkpoint directory (named in the message).
        recorded: the checkpoint's ``model_settings`` (None: an older checkpoint, not checked).
        expected: :func:`model_settings` of the model about to be loaded (None: not checked).
        source: where ``expected`` comes from, e.g. "this run's config.yaml".

    Raises:
        CheckpointMismatchError: with ``path`` ``model.<key>``.
    """
    if not recorded or not expected:
        return
    for key in SHAPE_KEYS:
        if key in recorded and key in expected and recorded[key] != expected[key]:
            raise CheckpointMismatchError(
                f"model.{key}",
                f"checkpoint {checkpoint.name} ({checkpoint}) has {key} {recorded[key]}, "
                f"{source} says {expected[key]}: it was trained with another recipe",
            )


def _messages(exc: BaseException):
    yield str(exc)
    # torch.distributed.checkpoint's CheckpointException keeps each rank's own exception.
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            yield from _messages(inner)


def shape_mismatch_error(
    checkpoint: Path, source: str, exc: BaseException
) -> CheckpointMismatchError | None:
    """The loader's shape error for a checkpoint that records no settings, explained (None when
    ``exc`` is no shape or key mismatch)."""
    for message in _messages(exc):
        for line in message.splitlines():
            if "shape mismatch" in line or "not in state dict" in line:
                return CheckpointMismatchError(
                    "model",
                    f"checkpoint {checkpoint.name} ({checkpoint}) does not fit the model "
                    f"{source} describes (it was trained with another recipe): {line[:300]}",
                )
    return None
