"""One checkpoint key layout for the Transformer Engine and the local implementation.

A run trained on GPU with TE must be evaluable and diagnosable on a CPU with the local spec, and
back. Two things differ between the specs' ``sharded_state_dict`` keys:

* Norm placement: TE fuses the pre-norms into ``linear_qkv`` / ``linear_fc1``; the local spec
  keeps them standalone and renames them to the fused names through the layer's
  ``sharded_state_dict_keys_map``. The split-Q/K/V layer spec applies the same rename on TE
  (``megatron_qk.models.specs.INPUT_NORM_KEY_MAP``).
* ``_extra_state``: every TE module and every local ``ColumnParallelLinear`` / ``RowParallelLinear``
  stores an ``_extra_state`` object (FP8 scaling metadata for TE, ``None`` for local), and which
  modules have one differs between the specs (e.g. ``TEDotProductAttention``, the split layer's
  parameter-free ``fused_runner``). megatron-qk trains in bf16/fp32 only, where that state is
  empty, so the canonical layout leaves every ``_extra_state`` out of checkpoints.
"""

from __future__ import annotations

import torch

EXTRA_STATE_SUFFIX = "_extra_state"


def is_extra_state_key(key: str) -> bool:
    """Whether a state-dict key is a module's ``_extra_state`` entry."""
    return key.rsplit(".", 1)[-1] == EXTRA_STATE_SUFFIX


def canonical_sharded_state_dict(model: torch.nn.Module) -> dict:
    """``model.sharded_state_dict()`` without ``_extra_state`` entries (the canonical layout)."""
    sharded = model.sharded_state_dict()
    return {k: v for k, v in sharded.items() if not is_extra_state_key(k)}


def load_canonical_state_dict(model: torch.nn.Module, state: dict) -> None:
    """Load a canonical-layout state dict: only ``_extra_state`` entries may be absent.

    Raises:
        RuntimeError: a parameter or buffer is missing, or the state holds keys the model lacks.
    """
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_extra_state_key(k)]
    unexpected = [k for k in result.unexpected_keys if not is_extra_state_key(k)]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint does not match the model: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )


def canonical_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's tensors by canonical checkpoint key (the global key of each sharded entry)."""
    return {v.key: v.data for v in canonical_sharded_state_dict(model).values()}


@torch.no_grad()
def copy_canonical_weights(src: torch.nn.Module, dst: torch.nn.Module) -> int:
    """Copy every weight of ``src`` into ``dst`` by canonical key (TE <-> local, one process).

    Returns:
        The number of tensors copied.

    Raises:
        KeyError: the two models do not have the same canonical keys.
    """
    source, target = canonical_tensors(src), canonical_tensors(dst)
    if set(source) != set(target):
        raise KeyError(f"canonical keys differ: {sorted(set(source) ^ set(target))[:8]}")
    for key, tensor in target.items():
        tensor.copy_(source[key])
    return len(target)
