"""The training objective: Megatron's per-micro-batch loss callbacks and their reduction.

:func:`token_loss` is what the pipeline schedule calls on each micro-batch's output;
:func:`token_loss_with_penalty` adds a per-token penalty (the entropy floor's,
:func:`entropy_floor_penalty`); :func:`global_loss` averages the reported language-model loss
over the global batch, identically on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_qk.training.distributed import ParallelInfo


def token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron loss callback: (token-loss sum, token count, reporting dict)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    # clone: the schedule divides the returned tensor in place.
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def token_loss_with_penalty(
    loss_mask: torch.Tensor,
    penalty_fn: Callable[[], torch.Tensor | None],
    output_tensor: torch.Tensor,
):
    """:func:`token_loss` plus the penalty ``penalty_fn()`` of this micro-batch.

    The penalty is added per token (``penalty * num_tokens`` to the token-loss sum), so after
    Megatron divides by the token count the objective is ``lm_loss + penalty``; the reported
    ``lm loss`` stays the language-model loss alone.
    """
    loss_sum, num_tokens, report = token_loss(loss_mask, output_tensor)
    penalty = penalty_fn()
    if penalty is not None:
        loss_sum = loss_sum + penalty * num_tokens
    return loss_sum, num_tokens, report


def global_loss(loss_dicts: list[dict], info: ParallelInfo, device: torch.device) -> float:
    """Mean token loss over the global batch, identical on every rank.

    Only the last pipeline stage holds loss reports; each data-parallel replica's tp-rank-0 copy
    is summed over the whole world so every rank (all stages) gets the same value.
    """
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if info.is_last_stage and info.tp_rank == 0:
        for d in loss_dicts:
            totals += d["lm loss"].to(device=device, dtype=torch.float64)
    if torch.distributed.is_initialized() and info.world_size > 1:
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def entropy_floor_penalty(upper_entropy: torch.Tensor, h0: float, weight: float) -> torch.Tensor:
    """The entropy-floor term ``weight * max(0, h0 - H_upper)`` (Appendix D).

    Args:
        upper_entropy: differentiable mean upper-half attention entropy (normalised to [0, 1]).
        h0: the floor (paper: 0.8).
        weight: ``lam * controller.factor(step)``, from
            ``MultiplierScheduler.entropy_floor_weight()``.
    """
    return weight * torch.clamp(h0 - upper_entropy, min=0.0)
