"""Typed builders for the lines of ``metrics.jsonl`` (docs/RUN_DIRECTORY.md).

Every line is a JSON object with a ``kind``: ``train``, ``eval``, ``diag``, ``release`` or
``event``. The builders fix each kind's field names and their order in the line, which readers
(compare, plot, replay, the quickstart report) and byte-for-byte comparisons of run directories
rely on. Where a run stands is a :class:`Position`: the optimizer step, its fraction of the
planned steps and the tokens consumed, all derived from the step by one formula.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("train", "eval", "diag", "release", "event")

# exp() of a larger loss overflows a float; perplexities past it are reported as exp(700).
_MAX_LOG_PPL = 700.0


@dataclass(frozen=True)
class Position:
    """Where a run stands after ``step`` optimizer steps.

    Attributes:
        step: completed optimizer steps.
        frac: ``step / planned_steps``.
        tokens: tokens consumed, ``step * tokens_per_step``.
    """

    step: int
    frac: float
    tokens: int

    @classmethod
    def after(cls, step: int, planned_steps: int, tokens_per_step: int) -> Position:
        """The position after ``step`` steps of a run planned for ``planned_steps``.

        Args:
            step: completed optimizer steps.
            planned_steps: the run's planned optimizer steps.
            tokens_per_step: tokens one optimizer step consumes (global batch x sequence length).
        """
        return cls(step=step, frac=step / planned_steps, tokens=step * tokens_per_step)


def train_record(
    at: Position,
    *,
    loss: float,
    lr: float,
    grad_norm: float | None,
    step_seconds: float,
    throughput: Mapping[str, float],
    multipliers: Mapping[str, float],
) -> dict[str, Any]:
    """A ``train`` line: loss, lr and timing of one optimizer step.

    Args:
        at: the position after the step.
        loss: mean token loss of the step's global batch.
        lr: the base learning rate the update applied.
        grad_norm: the global gradient norm (None when the optimizer reports none).
        step_seconds: wall time of the step.
        throughput: ``tokens_per_second``, ``tflops_per_gpu``, ``mfu``, ``peak_memory_gib``.
        multipliers: each rule's factor in force for the update, written as ``mult/<rule>``.
    """
    record: dict[str, Any] = {
        "kind": "train",
        "step": at.step,
        "tokens": at.tokens,
        "frac": at.frac,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "step_seconds": step_seconds,
    }
    record.update(throughput)
    for name, factor in multipliers.items():
        record[f"mult/{name}"] = factor
    return record


def eval_record(at: Position, *, val_loss: float) -> dict[str, Any]:
    """An ``eval`` line: validation loss and perplexity on the fixed held-out batches."""
    return {
        "kind": "eval",
        "step": at.step,
        "tokens": at.tokens,
        "frac": at.frac,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, _MAX_LOG_PPL)),
    }


def diag_record(at: Position, *, sequences: int, statistics: Mapping[str, Any]) -> dict[str, Any]:
    """A ``diag`` line: the attention probes on the held-out diagnostic sequences.

    Args:
        at: the position of the evaluation.
        sequences: number of held-out sequences probed.
        statistics: the reduced probe statistics (``AttentionRecorder.reduce``), in their order.
    """
    return {
        "kind": "diag",
        "step": at.step,
        "tokens": at.tokens,
        "frac": at.frac,
        "sequences": sequences,
        **statistics,
    }


def release_record(
    at: Position,
    *,
    rule: str,
    reason: str,
    score: float | None = None,
    threshold: float | None = None,
    threshold_mode: str | None = None,
) -> dict[str, Any]:
    """A ``release`` line: a rule released its multiplier.

    Args:
        at: the release step's position.
        rule: the rule's name.
        reason: ``maturity``, ``forced`` or ``fixed``.
        score: maturity rules: the last counted maturity score.
        threshold: maturity rules: the threshold compared with; None for other rules, whose
            line then carries no ``score``/``threshold``/``threshold_mode`` fields.
        threshold_mode: maturity rules: ``absolute`` or ``over_uniform``.
    """
    record: dict[str, Any] = {
        "kind": "release",
        "rule": rule,
        "reason": reason,
        "step": at.step,
        "frac": at.frac,
        "tokens": at.tokens,
    }
    if threshold is not None:
        record.update(score=score, threshold=threshold, threshold_mode=threshold_mode)
    return record


def event_record(event: str, at: Position, **fields: Any) -> dict[str, Any]:
    """An ``event`` line (``sharp_entropy_crossing``, ``preempted``) with its own ``fields``."""
    return {
        "kind": "event",
        "event": event,
        "step": at.step,
        "frac": at.frac,
        "tokens": at.tokens,
        **fields,
    }
