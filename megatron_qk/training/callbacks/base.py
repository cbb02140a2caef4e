"""The hooks the training loop calls (the shape of OLMo-core's trainer callbacks).

Per optimizer step the :class:`~megatron_qk.training.loop.Trainer` calls, in order of the
callback list: :meth:`Callback.pre_step`; :meth:`Callback.forward_backward` (a context around
the step's forward and backward passes); :meth:`Callback.post_step` with the step's train
record, before the loop logs it; :meth:`Callback.on_eval` inside every evaluation, model in eval
mode; :meth:`Callback.end_of_step` after the step's evaluation and checkpoint. A callback's
:meth:`Callback.state_dict` is saved under :attr:`Callback.state_key` in the checkpoint's
``extra`` and handed back to :meth:`Callback.load_state_dict` on resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_qk.training.loop import Trainer


class Callback:
    """Base class: every hook does nothing; override the ones a feature needs."""

    # Key of this callback's state in the checkpoint's ``extra`` (None: no state to save).
    state_key: str | None = None

    def pre_train(self, trainer: Trainer) -> None:
        """Called by ``Trainer.run`` after resuming, before the first step."""

    def pre_step(self, trainer: Trainer) -> None:
        """Called before optimizer step ``trainer.step + 1`` starts."""

    @contextlib.contextmanager
    def forward_backward(self, trainer: Trainer) -> Iterator[None]:
        """A context around the forward and backward passes of one training step."""
        yield

    def post_step(self, trainer: Trainer, record: dict) -> None:
        """Called after optimizer step ``trainer.step`` with its train record (not yet logged)."""

    def on_eval(self, trainer: Trainer, record: dict) -> None:
        """Called inside an evaluation (model in eval mode), after its eval record was logged."""

    def end_of_step(self, trainer: Trainer) -> None:
        """Called after the step's evaluation and checkpoint; may stop the run by raising."""

    def post_train(self, trainer: Trainer) -> None:
        """Called when ``Trainer.run`` leaves its loop, also on an error."""

    def state_dict(self) -> Any:
        """This callback's checkpointed state (plain picklable values)."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Restore the state :meth:`state_dict` returned."""
