"""Shared fixtures.

Two modes. By default the suite runs on the CPU even on a GPU host: CUDA is hidden before torch
initialises it, so ``auto`` choices (bf16, Transformer Engine, NCCL) resolve to fp32, the local
spec and gloo, as the fp32-equality and 2-process tests assume; the GPU-marked tests are skipped.
With ``MQK_TEST_GPU=1`` (``tools/gpu_check.sh``) only the GPU-marked tests run, with CUDA.
"""

import os
import signal

GPU_MODE = os.environ.get("MQK_TEST_GPU") == "1"

# A suite started in the background of a non-interactive shell (`cmd &` in a script, as .ci/run
# starts its second leg, or nohup) inherits SIGINT ignored, and so does every process a test
# starts: a Ctrl-C test would then wait for an interruption that never comes. The signal tests
# play a terminal's Ctrl-C, which reaches processes with Python's default handler, so the suite
# restores it (a caught signal is reset to the default on exec, which the children then get).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if not GPU_MODE:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the 2-process tests' children too

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_qk.config.loader import load_config  # noqa: E402


@pytest.fixture(scope="module")
def single_rank():
    """A one-process gloo group with Megatron's parallel state (TP=PP=DP=1)."""
    from megatron_qk.training.distributed import setup_distributed, teardown_distributed

    setup_distributed(load_config("tiny"))
    yield
    teardown_distributed()


def assert_paper_rule(rule) -> None:
    """The paper's intervention: upper-half W_Q/W_K at x0.25, lower-copy maturity release."""
    assert (rule.layers, rule.roles, rule.multiplier, rule.release) == (
        "upper_half",
        ["q", "k"],
        0.25,
        "maturity",
    )
    assert (rule.threshold, rule.patience, rule.min_frac, rule.max_frac, rule.ramp_frac) == (
        0.005,
        3,
        0.03,
        0.12,
        0.01,
    )


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI or torchrun child: this process's launcher variables removed
    (the child sets up its own process group) and one thread per process (several share the
    2 cores)."""
    launcher = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests run only in GPU mode with CUDA; the others only in CPU mode."""
    if GPU_MODE:
        skip_cpu = pytest.mark.skip(reason="CPU test (MQK_TEST_GPU=1 runs the gpu marker only)")
        for item in items:
            if item.get_closest_marker("gpu") is None:
                item.add_marker(skip_cpu)
        if torch.cuda.is_available():
            return
    skip = pytest.mark.skip(reason="needs CUDA and MQK_TEST_GPU=1 (marker: gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
