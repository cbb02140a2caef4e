"""Loss terms added to the language-model loss during training."""

from __future__ import annotations

import torch


def entropy_floor_penalty(upper_entropy: torch.Tensor, h0: float, weight: float) -> torch.Tensor:
    """The entropy-floor term ``weight * max(0, h0 - H_upper)`` (Appendix D).

    Args:
        upper_entropy: differentiable mean upper-half attention entropy (normalised to [0, 1]).
        h0: the floor (paper: 0.8).
        weight: ``lam * controller.factor(step)``, from
            ``MultiplierScheduler.entropy_floor_weight()``.
    """
    return weight * torch.clamp(h0 - upper_entropy, min=0.0)
