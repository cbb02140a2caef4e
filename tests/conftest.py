"""Shared fixtures."""

import pytest

from megatron_qk.config.loader import load_config


@pytest.fixture(scope="module")
def single_rank():
    """A one-process gloo group with Megatron's parallel state (TP=PP=DP=1)."""
    from megatron_qk.training.distributed import setup_distributed, teardown_distributed

    setup_distributed(load_config("tiny"))
    yield
    teardown_distributed()
