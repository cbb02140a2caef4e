"""Process-group and model-parallel setup for one training process.

Works under ``torchrun`` (reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT) and as a plain
single process (creates a one-rank group on a free loopback port). NCCL with CUDA, gloo otherwise;
without CUDA the compatibility layer in ``megatron_qk.compat`` is activated first.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch

from megatron_qk.compat import activate_cpu_compat
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.models.speed import set_cuda_device_max_connections


@dataclass
class ParallelInfo:
    """Ranks and sizes of this process in every parallel dimension."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        """First pipeline stage (holds the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Last pipeline stage (holds the output layer and computes the loss)."""
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that writes metrics and the run directory (global rank 0)."""
        return self.rank == 0


def world_size_from_env() -> int:
    """WORLD_SIZE set by torchrun, or 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cfg: ExperimentConfig) -> ParallelInfo:
    """Validate the layout against the world size, then start process groups and Megatron state.

    Raises:
        ConfigError: before any process group starts, if the layout does not fit the world size.
    """
    world_size = world_size_from_env()
    cfg.validate_world(world_size)
    from megatron.core import parallel_state

    use_cuda = torch.cuda.is_available()
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise RuntimeError("parallel.backend: nccl needs CUDA; use gloo or auto on CPU")
    activate_cpu_compat()
    device = torch.device("cpu")
    if use_cuda:
        # Read when the CUDA context is created (by set_device below): torchrun's workers
        # inherit it from `megatron-qk train`, a single process sets it here itself.
        set_cuda_device_max_connections()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if world_size == 1 and not torch.distributed.is_initialized() and not launched_by_torchrun:
        # A one-process group on a fresh loopback port: a stale MASTER_PORT left by an earlier
        # run in this process (or inherited) must not be reused. Under torchrun the rank joins
        # the agent's store at MASTER_PORT instead, so that port must be kept.
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1"
        )
    if not torch.distributed.is_initialized():
        # NCCL with a device_id binds each rank's communicator to its GPU eagerly, instead of
        # guessing the device at the first collective (and warning that it may hang).
        torch.distributed.init_process_group(
            backend=backend,
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            device_id=device if backend == "nccl" else None,
        )
    p = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        # In-process reuse (tests, notebooks): only the same layout may be reused.
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if have != (p.tensor_model_parallel_size, p.pipeline_model_parallel_size):
            raise RuntimeError(
                f"Megatron parallel state is already initialised with TP/PP={have}; call "
                "teardown_distributed() before training another layout in this process"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        )
    seed_everything(cfg.training.seed)
    return ParallelInfo(
        rank=torch.distributed.get_rank(),
        world_size=world_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=p.tensor_model_parallel_size,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=p.pipeline_model_parallel_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=torch.device("cuda", torch.cuda.current_device())
        if use_cuda
        else torch.device("cpu"),
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def teardown_distributed() -> None:
    """Destroy Megatron's parallel state and the process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
