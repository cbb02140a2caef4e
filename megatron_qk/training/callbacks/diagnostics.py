"""The held-out attention diagnostics: a ``diag`` line after every evaluation."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from megatron_qk.rundir.records import diag_record
from megatron_qk.training.callbacks.base import Callback
from megatron_qk.training.data import held_out_micro_batches

if TYPE_CHECKING:
    from megatron_qk.training.loop import Trainer


class HeldOutDiagnostics(Callback):
    """Runs the attention probes on the held-out sequences at every evaluation (collective).

    The ``diag`` record (with the maturity score the run's first maturity rule compares) becomes
    ``trainer.last_diag`` for the callbacks after this one (sharp-entropy event, release rules)
    and is logged.
    """

    def on_eval(self, trainer: Trainer, record: dict) -> None:
        diag = self.measure(trainer)
        uniform = diag.get("lower_copy_uniform", math.nan)
        diag["maturity_score"] = trainer.scheduler.maturity_score(diag["lower_copy"], uniform)
        trainer.last_diag = diag
        trainer.log(diag)

    @torch.no_grad()
    def measure(self, trainer: Trainer) -> dict:
        """The ``diag`` record of the fixed held-out diagnostic sequences (collective).

        Exactly the first ``diagnostics.num_sequences`` validation samples, whatever the layout:
        they are dealt over whole micro-batches of the data-parallel ranks, the slots past the
        last one are padded and masked out of the statistics (``valid_rows``), so every layout
        gives the same ``diag`` values and the same release. They go through the model's own
        forward pass; the recorder recomputes each layer's attention from its post-RoPE Q/K.
        """
        t, d, info = trainer.cfg.training, trainer.cfg.diagnostics, trainer.info
        per_round = t.micro_batch_size * info.dp_size
        rounds = max(1, -(-d.num_sequences // per_round))
        valid = trainer.datasets.valid
        batches = held_out_micro_batches(
            valid,
            d.num_sequences,
            rounds,
            t.micro_batch_size,
            info.dp_rank,
            info.dp_size,
            info.device,
        )
        with trainer.recorder.statistics():
            trainer.run_batches(valid, 0, True, num_microbatches=rounds, data_iterator=batches)
        statistics = trainer.recorder.reduce(info.device)
        return diag_record(trainer.position(), sequences=d.num_sequences, statistics=statistics)
