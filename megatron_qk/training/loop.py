"""The training loop: Megatron-Core model, DDP, optimizer and pipeline schedules, plainly.

One call of :func:`~megatron_qk.training.entry.train_from_config` runs (or resumes) a whole run
described by an :class:`~megatron_qk.config.schema.ExperimentConfig` and writes the run
directory described in docs/RUN_DIRECTORY.md.
The loop follows nanoGPT's shape: build, then ``for step: forward_backward; step; log; eval;
save``. Megatron does the parallel work (DDP / distributed optimizer, TP layers, 1F1B schedule).
What an experiment adds to it (entropy floor, attention diagnostics, release and sharp-entropy
logging, preemption, profiling) are callbacks (:mod:`megatron_qk.training.callbacks`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.diagnostics.recorder import AttentionRecorder
from megatron_qk.models.builder import build_gpt_model, padded_vocab_size, transformer_config_from
from megatron_qk.models.params import annotate_param_roles
from megatron_qk.models.speed import training_speed_flags
from megatron_qk.optim.param_groups import build_optimizer
from megatron_qk.rundir import records
from megatron_qk.rundir.layout import latest_checkpoint
from megatron_qk.training import checkpoint as ckpt
from megatron_qk.training import checkpoint_plan, losses, run_files
from megatron_qk.training.callbacks.base import Callback
from megatron_qk.training.callbacks.defaults import default_callbacks
from megatron_qk.training.callbacks.sharp_entropy import SharpEntropyEvent
from megatron_qk.training.checkpoint_settings import model_settings
from megatron_qk.training.console import StepLog
from megatron_qk.training.data import build_datasets, micro_batches
from megatron_qk.training.data_order import data_order_hash
from megatron_qk.training.distributed import ParallelInfo
from megatron_qk.training.eval_plan import evaluates_periodically, should_evaluate
from megatron_qk.training.run_dir import write_summary
from megatron_qk.training.sinks import MetricsSinks, ProgressBar
from megatron_qk.training.throughput import ThroughputMeter
from megatron_qk.training.warm_start import load_initial_weights
from megatron_qk.training.wrapping import attach_schedule_hooks, wrap_for_training

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stopped before applying that step."""


class Trainer:
    """Holds the built model, optimizer and data for one run; :meth:`run` trains it.

    Args:
        cfg: the recipe.
        info: this process's place in the parallel layout.
        callbacks: the experiment's hooks; default
            :func:`~megatron_qk.training.callbacks.defaults.default_callbacks`. More can be added
            with :meth:`add_callback` before :meth:`run`.
    """

    def __init__(
        self, cfg: ExperimentConfig, info: ParallelInfo, callbacks: list[Callback] | None = None
    ):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.training.output_dir)
        self.planned_steps = cfg.planned_steps()
        # The last step of this recipe: planned_steps, or training.stop_at_frac of it.
        self.end_step = checkpoint_plan.end_step(cfg)
        t = cfg.training
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * info.dp_size)
        self.bf16 = cfg.training.precision == "bf16" or (
            cfg.training.precision == "auto" and torch.cuda.is_available()
        )
        self.tf_config = transformer_config_from(
            cfg, bf16=self.bf16, **training_speed_flags(hidden_dropout=cfg.model.hidden_dropout)
        )
        model = build_gpt_model(cfg, config=self.tf_config, init_seed=cfg.training.seed)
        annotate_param_roles(model)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        # The wrappers below keep these module objects, so the recorder can be built on the bare
        # model; its initial Q/K snapshot is taken here, in fp32, before any resume or bf16 cast.
        self.recorder = AttentionRecorder([model], cfg.model.num_layers, cfg.diagnostics.chunk_size)
        if cfg.diagnostics.enabled:
            self.recorder.snapshot_initial_qk()
        self.model = wrap_for_training(cfg, self.tf_config, model, self.bf16)
        self.model_chunks = [self.model]
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model_chunks)
        attach_schedule_hooks(cfg, self.tf_config, self.model, self.optimizer)
        self.forward_backward = get_forward_backward_func()
        self.datasets = build_datasets(cfg, self.planned_steps, str(self.run_dir))
        self.data_order = data_order_hash(
            self.datasets.train, self.datasets.valid, t.eval_iters * t.global_batch_size
        )
        self.step = 0
        self.consumed_samples = 0
        # The step of the last checkpoint saved or resumed from in this process (None: none).
        self.saved_step: int | None = None
        self.last_eval: dict | None = None
        # The diag record of the latest evaluation (set by the diagnostics callback).
        self.last_diag: dict | None = None
        # A per-token loss term of the current training micro-batch, set by a callback for the
        # forward/backward passes of one step (the entropy floor), else None.
        self.loss_penalty: Callable[[], torch.Tensor | None] | None = None
        self.throughput = ThroughputMeter(cfg, padded_vocab_size(cfg), info.world_size)
        self.callbacks = default_callbacks(cfg, info) if callbacks is None else list(callbacks)
        self._sinks: MetricsSinks | None = None
        self._bar: ProgressBar | None = None
        self._step_log: StepLog | None = None

    def add_callback(self, callback: Callback) -> None:
        """Append a callback (its hooks run after the others')."""
        self.callbacks.append(callback)

    def position(self, step: int | None = None) -> records.Position:
        """Step, fraction of the plan and tokens after ``step`` (default: the current) steps."""
        step = self.step if step is None else step
        return records.Position.after(step, self.planned_steps, self.cfg.tokens_per_step())

    def log(self, record: dict) -> None:
        """Write a metrics record to the run's sinks (nothing outside :meth:`run`)."""
        if self._sinks is not None:
            self._sinks.write(record)

    def announce(self, text: str) -> None:
        """Print a line above the progress bar (nothing outside :meth:`run`)."""
        if self._bar is not None:
            self._bar.write(text)

    # ----------------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        self.recorder.set_tokens(batch["tokens"], batch.get("valid_rows"))
        output = model(
            batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
        )
        if self.loss_penalty is not None:
            loss_fn = partial(losses.token_loss_with_penalty, batch["loss_mask"], self.loss_penalty)
            return output, loss_fn
        return output, partial(losses.token_loss, batch["loss_mask"])

    def run_batches(
        self,
        dataset,
        start: int,
        forward_only: bool,
        num_microbatches: int | None = None,
        data_iterator=None,
    ) -> float:
        """Forward (and, unless ``forward_only``, backward) passes over one global batch.

        Args:
            dataset: the dataset the micro-batches are cut from.
            start: index of the batch's first sample in ``dataset``.
            forward_only: no backward pass (evaluation).
            num_microbatches: micro-batches per data-parallel rank (default: the training's).
            data_iterator: micro-batches to run instead of the ones cut from ``dataset``.

        Returns:
            The mean token loss over the batch, identical on every rank.
        """
        t = self.cfg.training
        num_microbatches = num_microbatches or self.num_microbatches
        it = data_iterator or micro_batches(
            dataset,
            start,
            num_microbatches,
            t.micro_batch_size,
            self.info.dp_rank,
            self.info.dp_size,
            self.info.device,
        )
        loss_dicts = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=it,
            model=self.model,
            num_microbatches=num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )
        return losses.global_loss(loss_dicts, self.info, self.info.device)

    def train_step(self) -> dict:
        """One optimizer step on the next global batch; returns the train record."""
        t = self.cfg.training
        for cb in self.callbacks:
            cb.pre_step(self)
        start = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        with contextlib.ExitStack() as stack:
            for cb in self.callbacks:
                stack.enter_context(cb.forward_backward(self))
            loss = self.run_batches(self.datasets.train, self.consumed_samples, forward_only=False)
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at step {self.step + 1}; the step was not applied. "
                f"The last good checkpoint (if any) is in {self.run_dir / 'checkpoints'}: lower "
                "optim.lr or check the data, then rerun to resume from it."
            )
        # The lr and multipliers in the groups now are the ones this update applies.
        lr, multipliers = self._base_lr(), self.scheduler.multipliers()
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok:
            raise NonFiniteLossError(f"optimizer skipped step {self.step + 1} (non-finite grads)")
        self.scheduler.step(increment=t.global_batch_size)
        self.step += 1
        self.consumed_samples += t.global_batch_size
        elapsed = time.perf_counter() - start
        record = records.train_record(
            self.position(),
            loss=loss,
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            step_seconds=elapsed,
            throughput=self.throughput.fields(elapsed),  # tokens/s, TFLOP/s/GPU, MFU, memory
            multipliers=multipliers,
        )
        for cb in self.callbacks:
            cb.post_step(self, record)
        return record

    def _base_lr(self) -> float:
        for group in self.optimizer.param_groups:
            if not group.get("mqk_rule"):
                return group["lr"]
        return self.optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss/perplexity on the fixed held-out batches, then the callbacks'
        :meth:`~megatron_qk.training.callbacks.base.Callback.on_eval` (the diag probes, ...).

        The model is in eval mode for the duration (no dropout), then back in train mode. The
        eval record is logged (inside :meth:`run`) and kept as ``last_eval``.
        """
        for chunk in self.model_chunks:
            chunk.eval()
        try:
            t = self.cfg.training
            val_losses = [
                self.run_batches(self.datasets.valid, i * t.global_batch_size, forward_only=True)
                for i in range(t.eval_iters)
            ]
            record = records.eval_record(
                self.position(), val_loss=sum(val_losses) / len(val_losses)
            )
            self.last_eval = record
            self.log(record)
            self.last_diag = None
            for cb in self.callbacks:
                cb.on_eval(self, record)
            return record
        finally:
            for chunk in self.model_chunks:
                chunk.train()

    # ----------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint the current state (collective), then rotate old interval checkpoints."""
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            self.model_chunks,
            self.optimizer,
            ckpt.TrainState(
                step=self.step,
                consumed_samples=self.consumed_samples,
                scheduler=self.scheduler.state_dict(),
                extra={cb.state_key: cb.state_dict() for cb in self.callbacks if cb.state_key},
                model_settings=model_settings(self.cfg.model),
            ),
        )
        self.saved_step = self.step
        if self.info.is_logging_rank:
            checkpoint_plan.rotate_checkpoints(self.cfg, self.run_dir / "checkpoints")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return path

    def maybe_resume(self) -> bool:
        """Resume from the latest checkpoint in the run directory, if any and allowed.

        The scheduler holds the release state; a ``releases`` entry that older checkpoints also
        keep in ``extra`` duplicates it and is not read.
        """
        if not self.cfg.training.resume:
            return False
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            return False
        state = ckpt.load_checkpoint(
            path,
            self.model_chunks,
            self.optimizer,
            seed=self.cfg.training.seed,
            expected_model=model_settings(self.cfg.model),
        )
        self.scheduler.load_state_dict(state.scheduler)
        self.step, self.consumed_samples = state.step, state.consumed_samples
        self.saved_step = self.step
        for cb in self.callbacks:
            if cb.state_key:
                cb.load_state_dict(state.extra.get(cb.state_key))
        return True

    def run(self) -> dict:
        """Train to the planned step (or ``exit_after_steps``) and return the summary."""
        cfg, info = self.cfg, self.info
        run_files.claim(cfg, info, self.run_dir)
        resumed = self.maybe_resume()
        warm_start = (
            None if resumed or not cfg.training.init_checkpoint else load_initial_weights(self)
        )
        if resumed and self.step >= self.end_step:
            summary = run_files.finished_summary(self.run_dir)
            if summary is not None:
                logger.info("run in %s already finished; nothing to do", self.run_dir)
                return summary
        run_files.start_metrics(cfg, info, self.run_dir, self.step if resumed else None)
        self._sinks = run_files.open_sinks(cfg, info, self.run_dir)
        self._bar = run_files.open_progress_bar(cfg, info, self.planned_steps, self.step)
        self._step_log = run_files.open_step_log(cfg, info, self.end_step, self.step)
        if resumed:
            self.announce(f"resumed from step {self.step} ({self.consumed_samples} samples)")
        elif warm_start:
            self.announce(warm_start)
        start_step = self.step
        try:
            for cb in self.callbacks:
                cb.pre_train(self)
            self._train_loop()
            if self.step > start_step and self.saved_step != self.step:
                self.save()
        finally:
            for cb in self.callbacks:
                cb.post_train(self)
            self._bar.close()
            self._sinks.close()
            self._bar = self._sinks = None
        if self.step == self.end_step and self.last_eval is None and evaluates_periodically(cfg):
            # Resumed from the final checkpoint of a run killed before its summary was written.
            self.evaluate()
        summary = self.summary()
        if info.is_logging_rank and self.step == self.end_step:
            write_summary(self.run_dir, summary)
        return summary

    def _train_loop(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        stop_at = self.end_step
        if t.exit_after_steps is not None:
            stop_at = min(stop_at, self.step + t.exit_after_steps)
        if self.step == 0 and evaluates_periodically(cfg):
            self._evaluate_and_announce()
        while self.step < stop_at:
            record = self.train_step()
            if self.step % t.log_interval == 0 or self.step == stop_at:
                self.log(record)
                self._step_log.print(record)
            self._bar.update(record)
            is_last = self.step == self.end_step
            if is_last or should_evaluate(cfg, self.step):
                self._evaluate_and_announce()
            if checkpoint_plan.is_save_step(cfg, self.step) and self.step != stop_at:
                self.save()
            for cb in self.callbacks:
                cb.end_of_step(self)

    def _evaluate_and_announce(self) -> None:
        record = self.evaluate()
        self.announce(
            f"step {self.step}/{self.planned_steps}: val_loss {record['val_loss']:.4f} "
            f"ppl {record['val_ppl']:.2f}"
        )

    def _state_of(self, callback_type: type[Callback]):
        for cb in self.callbacks:
            if isinstance(cb, callback_type):
                return cb.state_dict()
        return None

    def summary(self) -> dict:
        """The run's ``summary.json`` content at the current step."""
        last = self.last_eval or {}
        return {
            "name": self.cfg.name,
            "arm": self.cfg.arm,
            "seed": self.cfg.training.seed,
            "steps": self.step,
            "planned_steps": self.planned_steps,
            "finished": self.step == self.planned_steps,
            "tokens": self.position().tokens,
            "final_val_loss": last.get("val_loss"),
            "final_val_ppl": last.get("val_ppl"),
            "release": self.scheduler.releases(),
            "sharp_entropy_crossing": self._state_of(SharpEntropyEvent),
            # Stopped on purpose at training.stop_at_frac (not finished, but complete).
            "stopped": self.step == self.end_step < self.planned_steps,
            "data_order": self.data_order,
        }
