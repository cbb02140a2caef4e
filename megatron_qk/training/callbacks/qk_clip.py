"""QK-clip and max-logit logging as a training callback (``optim.qk_clip``).

The step's forward passes collect each head's max pre-softmax logit (the capturing core
attention, :mod:`megatron_qk.models.qk_capture`; evaluation passes are not collected); after
``optimizer.step()`` :class:`~megatron_qk.optim.qk_clip.QKClip` reduces them, clips the selected
layers (``enabled``) and the train line gets ``max_attention_logit``: the max over every layer
and head of the logits the step's update was computed from (before its clip).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from megatron_qk.optim.qk_clip import QKClip
from megatron_qk.training.callbacks.base import Callback

if TYPE_CHECKING:
    from megatron_qk.training.loop import Trainer


class QKClipStep(Callback):
    """Collect the max attention logit each step; clip W_Q/W_K after the optimizer step."""

    def __init__(self) -> None:
        self.clip: QKClip | None = None

    def pre_train(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        self.clip = QKClip(
            cfg.optim.qk_clip, trainer.model_chunks, trainer.optimizer, cfg.model.num_layers
        )

    @contextlib.contextmanager
    def forward_backward(self, trainer: Trainer) -> Iterator[None]:
        self.clip.collect(True)
        try:
            yield
        finally:
            self.clip.collect(False)

    def post_step(self, trainer: Trainer, record: dict) -> None:
        record["max_attention_logit"] = self.clip.after_step()
