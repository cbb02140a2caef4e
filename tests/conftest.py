"""Shared fixtures."""

import pytest
import torch

from megatron_qk.config.loader import load_config


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


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests run only where CUDA is available (reported as skipped elsewhere)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
