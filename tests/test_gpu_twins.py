"""``tests/gpu_twins.py`` on the CPU: what test_gpu.py uses instead of ``copy.deepcopy``."""

from __future__ import annotations

import copy

import pytest
import torch
from gpu_twins import seeded_twins

from megatron_qk.config.loader import load_config


def test_a_built_model_cannot_be_deep_copied(single_rank):
    """Why the GPU test builds twice: Megatron modules hold unpicklable ProcessGroups."""
    from megatron_qk.models.builder import build_gpt_model

    with pytest.raises(TypeError, match="ProcessGroup"):
        copy.deepcopy(build_gpt_model(load_config("tiny"), init_seed=5))


def test_seeded_twins_are_equal_and_independent(single_rank):
    first, second = seeded_twins(load_config("tiny"), seed=5)
    with torch.no_grad():
        next(second.parameters()).add_(1.0)  # separate storage: changing one leaves the other
    assert not torch.equal(next(first.parameters()), next(second.parameters()))
