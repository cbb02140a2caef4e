"""The ``sharp_entropy_crossing`` event: the first evaluation with sharp upper attention."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_qk.rundir.records import Position, event_record
from megatron_qk.training.callbacks.base import Callback

if TYPE_CHECKING:
    from megatron_qk.training.loop import Trainer


class SharpEntropyEvent(Callback):
    """Logs the first ``diag`` whose upper entropy is below the threshold, once per run.

    Its state, ``{step, frac, tokens}`` of the crossing or None, goes into the checkpoint (as
    ``sharp_crossing``) and into ``summary.json`` (as ``sharp_entropy_crossing``).

    Args:
        threshold: ``diagnostics.sharp_entropy_threshold``.
    """

    state_key = "sharp_crossing"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.crossing: dict | None = None

    def on_eval(self, trainer: Trainer, record: dict) -> None:
        diag = trainer.last_diag
        if diag is None or self.crossing is not None or not diag["upper_entropy"] < self.threshold:
            return
        self.crossing = {"step": diag["step"], "frac": diag["frac"], "tokens": diag["tokens"]}
        trainer.log(
            event_record(
                "sharp_entropy_crossing",
                Position(**self.crossing),
                upper_entropy=diag["upper_entropy"],
                threshold=self.threshold,
            )
        )
        trainer.announce(
            f"upper entropy {diag['upper_entropy']:.3f} crossed the sharpness "
            f"threshold {self.threshold} at step {diag['step']}"
        )

    def state_dict(self) -> dict | None:
        return self.crossing

    def load_state_dict(self, state: dict | None) -> None:
        self.crossing = state
