"""Resuming a checkpoint under another data-, tensor- or pipeline-parallel layout.

Model and optimizer state are Megatron distributed checkpoints (the optimizer in the
``fully_reshardable`` format), so dist-checkpointing reshards them onto any TP/PP/DP layout; the
data position is ``consumed_samples``, a global sample count, so it means the same thing on any
DP size. What does not carry over is per-rank RNG state: rank R of the new layout is not the
model shard rank R held before. So RNG states are restored only when the layout is the one the
checkpoint was saved with; otherwise every rank is re-seeded from the recipe seed and the step
(deterministic: a rerun of the same resume draws the same numbers) and a warning says so. Only
dropout draws from these generators (data order and initialisation have their own seeds).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_qk.rundir.layout import RNG_FILE_GLOB, rng_file_name
from megatron_qk.training.distributed import seed_everything
from megatron_qk.training.safe_load import load_state_file

logger = logging.getLogger(__name__)


def current_layout() -> dict[str, int]:
    """World size and TP/PP/DP sizes of the running process group (1s without one)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return {"world_size": 1, "tp": 1, "pp": 1, "dp": 1}
    return {
        "world_size": torch.distributed.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def reseed_value(seed: int, step: int) -> int:
    """The seed used after a layout change at ``step`` (same on every rank, like the first seed;
    Megatron's model-parallel tracker offsets it per tensor-parallel rank)."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


def capture_rng_state() -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch (and CUDA) and Megatron's tracker."""
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the states :func:`capture_rng_state` returned."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def restore_or_reseed_rng(
    path: Path, saved_layout: dict | None, seed: int, step: int, rank: int
) -> bool:
    """Restore this rank's RNG states from ``path``, or re-seed when the layout changed.

    Args:
        path: the checkpoint directory (holds ``rng_rank{R}.pt``).
        saved_layout: the layout recorded at save time (None for checkpoints older than the
            record: then the number of ``rng_rank*.pt`` files stands for the world size).
        seed: the recipe's ``training.seed``.
        step: the checkpoint's step.
        rank: this process's global rank.

    Returns:
        True when the saved states were restored, False when re-seeded.
    """
    now = current_layout()
    if saved_layout is None:
        saved_layout = {"world_size": len(list(path.glob(RNG_FILE_GLOB)))}
    same = all(saved_layout.get(k) == v for k, v in now.items() if k in saved_layout)
    rng_file = path / rng_file_name(rank)
    if same and rng_file.exists():
        restore_rng_state(load_state_file(rng_file))
        return True
    if rank == 0:
        logger.warning(
            "resuming %s under layout %s (saved under %s): RNG states re-seeded from "
            "training.seed and the step; dropout draws differ from an uninterrupted run",
            path,
            now,
            saved_layout,
        )
    seed_everything(reseed_value(seed, step))
    return False


def check_padded_vocab(path: Path, saved: int | None, current: int) -> None:
    """The embedding's padded vocabulary must match (it depends on TP x vocab_pad_multiple).

    Raises:
        ValueError: naming ``model.vocab_pad_multiple`` and both sizes.
    """
    if saved is not None and saved != current:
        raise ValueError(
            f"{path} has a padded vocabulary of {saved} rows, this layout pads to {current} "
            "(model.vocab_pad_multiple x TP): set model.vocab_pad_multiple so both layouts pad "
            "to the same size"
        )


def prepare_optimizer_for_load(optimizer) -> None:
    """Give a fresh optimizer the state entries a checkpoint load expects.

    A distributed optimizer builds its state dict from the inner optimizer's state, and without
    Apex/Transformer Engine (the CPU path) it reads each parameter's ``step``, which
    ``torch.optim.AdamW`` only creates at its first update: loading into a freshly built one
    fails. Zero moments (and, on that path only, step 0) are created here; the load then
    overwrites all of them.

    With Apex or Transformer Engine installed the inner optimizer is their ``FusedAdam``, which
    keeps ``step`` per parameter *group*, never per parameter: its ``state_dict`` converts every
    per-parameter state entry through a map from state name to dtype that knows only
    ``exp_avg``, ``exp_avg_sq`` and ``master_param`` (TE ``optimizers/fused_adam.py``,
    ``get_unscaled_state``), so a per-parameter ``step`` raises ``KeyError: 'step'``. The guard
    is the one :func:`load_optimizer_state` uses: Megatron's own ``HAVE_APEX_OR_TE``.
    """
    from megatron.core.optimizer import distrib_optimizer as dopt

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        # The other optimizers initialise their state themselves when asked for a load.
        if not isinstance(opt, dopt.DistributedOptimizer) or opt.init_state_fn is None:
            continue
        inner = opt.optimizer
        opt.init_state_fn(inner, opt.config)
        if dopt.HAVE_APEX_OR_TE:
            continue  # FusedAdam: step lives in the param groups (see above)
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if "step" not in state and "exp_avg" in state:
                    state["step"] = torch.tensor(0.0)


def load_optimizer_state(optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict``, working around a 0.16.1 distributed-optimizer load bug.

    Without Apex/Transformer Engine (the CPU path) ``DistributedOptimizer.load_state_dict`` first
    gives every parameter's AdamW state a ``step`` entry, then copies each state entry from the
    ``fully_reshardable`` parameter state, which has no ``step`` (``distrib_optimizer.py``
    ``_set_main_param_and_optimizer_states``: ``KeyError: 'step'``). So the two phases run here
    separately, with ``step`` set aside while the parameter state is copied in. That load also
    gives all parameters one shared ``step`` tensor, which ``torch.optim.AdamW`` then increments
    once per parameter on every update (wrong bias correction after a resume): each parameter
    gets its own copy.
    """
    from megatron.core.optimizer import distrib_optimizer as dopt

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    opt = chained[0]
    affected = (
        len(chained) == 1
        and isinstance(opt, dopt.DistributedOptimizer)
        and not dopt.HAVE_APEX_OR_TE
        and state_dict.get("param_state_sharding_type") == "fully_reshardable"
    )
    if not affected:
        optimizer.load_state_dict(state_dict)
        return
    skip = ("param_state", "param_state_sharding_type")
    opt.load_state_dict({k: v for k, v in state_dict.items() if k not in skip})
    inner = opt.optimizer
    steps = {p: s.pop("step") for p, s in inner.state.items() if "step" in s}
    try:
        opt.load_parameter_state_from_fully_reshardable(state_dict["param_state"])
    finally:
        for p, step in steps.items():
            inner.state[p]["step"] = step.detach().clone()
