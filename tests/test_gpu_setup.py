"""Process-group and device details of the GPU path, checked on the CPU: NCCL's ``device_id``,
``CUDA_DEVICE_MAX_CONNECTIONS`` on a single-process run, the peak FLOP rate by device name."""

from __future__ import annotations

import inspect

import pytest
import torch

from megatron_qk.config.loader import load_config
from megatron_qk.models.flops import peak_bf16_tflops
from megatron_qk.training import distributed


class _StopError(Exception):
    """Raised by the stand-in init_process_group: nothing after it is under test."""


def _setup_as_if_on_a_gpu(monkeypatch) -> tuple[dict, list]:
    """Run setup_distributed on a pretend one-GPU host up to init_process_group: the kwargs it
    got (bound to the installed signature) and the devices passed to ``set_device``."""
    seen: dict = {}
    devices: list = []

    def init_process_group(**kwargs):
        seen.update(kwargs)
        raise _StopError

    real = inspect.signature(torch.distributed.init_process_group)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed, "activate_cpu_compat", lambda: None)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    with pytest.raises(_StopError):
        distributed.setup_distributed(load_config("tiny"))
    real.bind(**seen)  # every keyword exists in the installed torch
    return seen, devices


def test_nccl_gets_the_local_gpu_as_device_id(monkeypatch):
    seen, devices = _setup_as_if_on_a_gpu(monkeypatch)
    assert seen["backend"] == "nccl"
    assert devices == [torch.device("cuda", 0)] and seen["device_id"] == devices[0]


def test_single_process_run_sets_cuda_device_max_connections(monkeypatch):
    """Not only torchrun's launcher: a one-process run creates its CUDA context itself."""
    import os

    _setup_as_if_on_a_gpu(monkeypatch)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


@pytest.mark.parametrize(
    ("name", "peak", "known"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0, True),
        ("NVIDIA H100 PCIe", 756.0, True),
        ("NVIDIA H100 NVL", 835.0, True),
        ("NVIDIA H200", 989.0, True),
        ("NVIDIA H200 NVL", 835.0, True),
        ("NVIDIA A100-SXM4-80GB", 989.0, False),
    ],
)
def test_peak_tflops_from_the_device_name(name, peak, known):
    assert peak_bf16_tflops(name) == (peak, known)


def test_bias_dropout_fusion_only_for_training_with_dropout(monkeypatch):
    """Its torch.compile (train and inference functions, every process) buys nothing without
    dropout, and an evaluation model never asks for it."""
    from megatron_qk.models import speed
    from megatron_qk.models.builder import transformer_config_from

    monkeypatch.setattr(speed, "te_available", lambda: False)
    assert "bias_dropout_fusion" not in speed.training_speed_flags(cuda=True)
    assert speed.training_speed_flags(cuda=True, hidden_dropout=0.1)["bias_dropout_fusion"]
    assert "bias_dropout_fusion" not in speed.training_speed_flags(cuda=False, hidden_dropout=0.1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert transformer_config_from(load_config("tiny")).bias_dropout_fusion is False


@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_master_weights_are_drawn_on_the_target_device(single_rank, monkeypatch, target):
    """Start-up: a CUDA model's full master weights are allocated (and drawn) on the GPU, not
    on the host. Megatron's CPU-initialisation path allocates with the default device, so the
    build must run under the target's device context."""
    import megatron.core.models.gpt as gpt

    from megatron_qk.models import builder

    seen = []

    class Recorder:
        def __init__(self, **kwargs):
            seen.append(torch.get_default_device())

    monkeypatch.setattr(gpt, "GPTModel", Recorder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: target == "cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    builder.build_gpt_model(load_config("tiny"), init_seed=1)
    builder.build_gpt_model(load_config("tiny"), init_seed=1, device=target)
    assert seen == [torch.device(target, 0) if target == "cuda" else torch.device("cpu")] * 2
