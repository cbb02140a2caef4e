"""Two identical models for the GPU tests, built from one seed (never ``copy.deepcopy``).

Megatron modules hold ``ProcessGroup`` handles, which cannot be pickled, so a deep copy of a
built model raises ``TypeError``; the second model is built again from the same seed instead
(the per-layer seeds fix the layers, the global seed the embedding and output layer).
"""

from __future__ import annotations

import torch


def seeded_twins(cfg, seed: int, device: torch.device | str = "cpu"):
    """Build ``cfg``'s model twice from ``seed`` on ``device``; the two hold equal weights."""
    from megatron_qk.models.builder import build_gpt_model

    twins = []
    for _ in range(2):
        torch.manual_seed(seed)
        twins.append(build_gpt_model(cfg, init_seed=seed, device=device).to(device).eval())
    first, second = (dict(m.named_parameters()) for m in twins)
    assert first.keys() == second.keys()
    for name, p in first.items():
        assert torch.equal(p, second[name]), f"{name} differs between the twins"
    return twins[0], twins[1]
