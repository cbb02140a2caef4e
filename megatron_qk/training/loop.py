"""The training loop: Megatron-Core model, DDP, optimizer and pipeline schedules, plainly.

One call of :func:`train` runs (or resumes) a whole run described by an
:class:`~megatron_qk.config.schema.ExperimentConfig` and writes the run directory described in
docs/RUN_DIRECTORY.md.
The loop follows nanoGPT's shape: build, then ``for step: forward_backward; step; log; eval;
save``. Megatron does the parallel work (DDP / distributed optimizer, TP layers, 1F1B schedule).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from megatron_qk.config.loader import config_to_dict
from megatron_qk.config.schema import ConfigError, ExperimentConfig
from megatron_qk.diagnostics.recorder import AttentionRecorder
from megatron_qk.rundir.layout import latest_checkpoint
from megatron_qk.training import checkpoint as ckpt
from megatron_qk.training import checkpoint_plan
from megatron_qk.training.data import build_datasets, held_out_micro_batches, micro_batches
from megatron_qk.training.data_order import data_order_hash
from megatron_qk.training.distributed import ParallelInfo
from megatron_qk.training.losses import entropy_floor_penalty
from megatron_qk.training.run_dir import check_resume_compatible, write_config, write_summary
from megatron_qk.training.run_identity import claim_run_dir
from megatron_qk.training.sinks import MetricsSinks, ProgressBar, truncate_metrics

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stopped before applying that step."""


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron loss callback: (token-loss sum, token count, reporting dict)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    # clone: the schedule divides the returned tensor in place.
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def _loss_with_floor(loss_mask, penalty_fn, output_tensor):
    """:func:`_loss_func` plus the entropy-floor penalty of this micro-batch.

    The penalty is added per token (``penalty * num_tokens`` to the token-loss sum), so after
    Megatron divides by the token count the objective is ``lm_loss + penalty``; the reported
    ``lm loss`` stays the language-model loss alone.
    """
    loss_sum, num_tokens, report = _loss_func(loss_mask, output_tensor)
    penalty = penalty_fn()
    if penalty is not None:
        loss_sum = loss_sum + penalty * num_tokens
    return loss_sum, num_tokens, report


def _global_loss(loss_dicts: list[dict], info: ParallelInfo, device: torch.device) -> float:
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


def check_entropy_floor_layout(cfg: ExperimentConfig) -> None:
    """The entropy floor adds its penalty in the loss, so every upper layer must be on the last
    pipeline stage (true for PP=1 and for PP=2 with an even layer count).

    Raises:
        ConfigError: naming the pipeline size when an upper layer sits on an earlier stage.
    """
    layers, pp = cfg.model.num_layers, cfg.parallel.pipeline_model_parallel_size
    first_on_last_stage = layers - layers // pp + 1
    if first_on_last_stage > layers // 2 + 1:
        raise ConfigError(
            "parallel.pipeline_model_parallel_size",
            f"optim.entropy_floor needs all upper-half layers ({layers // 2 + 1}-{layers}) on "
            f"the last pipeline stage, but with PP={pp} it starts at layer {first_on_last_stage}",
        )


class Trainer:
    """Holds the built model, optimizer and data for one run; :meth:`run` trains it."""

    def __init__(self, cfg: ExperimentConfig, info: ParallelInfo):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_qk.models.builder import build_gpt_model, transformer_config_from
        from megatron_qk.models.params import annotate_param_roles
        from megatron_qk.optim.param_groups import build_optimizer
        from megatron_qk.training.wrapping import attach_schedule_hooks, wrap_for_training

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
        from megatron_qk.models.speed import training_speed_flags

        self.tf_config = transformer_config_from(cfg, bf16=self.bf16, **training_speed_flags())
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
        self.releases: dict[str, dict] = {}
        self.last_eval: dict | None = None
        self.last_diag: dict | None = None
        self.sharp_crossing: dict | None = None
        self._floor_weight = 0.0
        maturity = any(r.release == "maturity" for r in cfg.optim.rules)
        self._diagnostics_needed = (
            cfg.diagnostics.enabled or maturity or cfg.optim.entropy_floor.enabled
        )
        if cfg.optim.entropy_floor.enabled:
            check_entropy_floor_layout(cfg)
        from megatron_qk.models.builder import padded_vocab_size
        from megatron_qk.training.throughput import StepProfiler, ThroughputMeter

        self.throughput = ThroughputMeter(cfg, padded_vocab_size(cfg), info.world_size)
        self.profiler = StepProfiler(cfg, info.rank, self.run_dir)
        # A PreemptionWatch polled after every step (train_from_config sets it), or None.
        self.preemption = None

    # ----------------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        self.recorder.set_tokens(batch["tokens"], batch.get("valid_rows"))
        output = model(
            batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
        )
        if self._floor_weight > 0:
            return output, partial(_loss_with_floor, batch["loss_mask"], self._floor_penalty)
        return output, partial(_loss_func, batch["loss_mask"])

    def _floor_penalty(self) -> torch.Tensor | None:
        upper_entropy = self.recorder.pop_upper_entropy()
        if upper_entropy is None:
            return None
        floor = self.cfg.optim.entropy_floor
        return entropy_floor_penalty(upper_entropy, floor.h0, self._floor_weight)

    def _run_batches(
        self,
        dataset,
        start: int,
        forward_only: bool,
        num_microbatches: int | None = None,
        data_iterator=None,
    ) -> float:
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
        return _global_loss(loss_dicts, self.info, self.info.device)

    def train_step(self) -> dict:
        """One optimizer step on the next global batch; returns the train record."""
        t = self.cfg.training
        start = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._floor_weight = self.scheduler.entropy_floor_weight()
        floor = self.recorder.entropy_floor() if self._floor_weight > 0 else nullcontext()
        with floor:
            loss = self._run_batches(self.datasets.train, self.consumed_samples, forward_only=False)
        self._floor_weight = 0.0
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
        record = {
            "kind": "train",
            "step": self.step,
            "tokens": self.consumed_samples * self.cfg.model.seq_length,
            "frac": self.step / self.planned_steps,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "step_seconds": elapsed,
        }
        record.update(self.throughput.fields(elapsed))  # tokens/s, TFLOP/s/GPU, MFU, memory
        for name, factor in multipliers.items():
            record[f"mult/{name}"] = factor
        return record

    def _base_lr(self) -> float:
        for group in self.optimizer.param_groups:
            if not group.get("mqk_rule"):
                return group["lr"]
        return self.optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss/perplexity (and the diag probes) on the fixed held-out batches.

        The model is in eval mode for the duration (no dropout), then back in train mode.
        """
        for chunk in self.model_chunks:
            chunk.eval()
        try:
            return self._evaluate()
        finally:
            for chunk in self.model_chunks:
                chunk.train()

    def _evaluate(self) -> dict:
        t = self.cfg.training
        losses = []
        for i in range(t.eval_iters):
            losses.append(
                self._run_batches(self.datasets.valid, i * t.global_batch_size, forward_only=True)
            )
        val_loss = sum(losses) / len(losses)
        self.last_diag = self._diagnose() if self._diagnostics_needed else None
        return {
            "kind": "eval",
            "step": self.step,
            "tokens": self.consumed_samples * self.cfg.model.seq_length,
            "frac": self.step / self.planned_steps,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 700.0)),
        }

    @torch.no_grad()
    def _diagnose(self) -> dict:
        """Attention probes on the fixed held-out diagnostic sequences (collective).

        Exactly the first ``diagnostics.num_sequences`` validation samples, whatever the layout:
        they are dealt over whole micro-batches of the data-parallel ranks, the slots past the
        last one are padded and masked out of the statistics (``valid_rows``), so every layout
        gives the same ``diag`` values and the same release. They go through the model's own
        forward pass; the recorder recomputes each layer's attention from its post-RoPE Q/K.
        """
        t, d = self.cfg.training, self.cfg.diagnostics
        per_round = t.micro_batch_size * self.info.dp_size
        rounds = max(1, -(-d.num_sequences // per_round))
        batches = held_out_micro_batches(
            self.datasets.valid,
            d.num_sequences,
            rounds,
            t.micro_batch_size,
            self.info.dp_rank,
            self.info.dp_size,
            self.info.device,
        )
        with self.recorder.statistics():
            self._run_batches(
                self.datasets.valid, 0, True, num_microbatches=rounds, data_iterator=batches
            )
        record = self.recorder.reduce(self.info.device)
        return {
            "kind": "diag",
            "step": self.step,
            "tokens": self.consumed_samples * self.cfg.model.seq_length,
            "frac": self.step / self.planned_steps,
            "sequences": d.num_sequences,
            **record,
        }

    # ----------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint the current state (collective), then rotate old interval checkpoints."""
        path = self._save()
        if self.info.is_logging_rank:
            checkpoint_plan.rotate_checkpoints(self.cfg, self.run_dir / "checkpoints")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return path

    def _save(self) -> Path:
        return ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            self.model_chunks,
            self.optimizer,
            ckpt.TrainState(
                step=self.step,
                consumed_samples=self.consumed_samples,
                scheduler=self.scheduler.state_dict(),
                extra={"releases": self.releases, "sharp_crossing": self.sharp_crossing},
            ),
        )

    def maybe_resume(self) -> bool:
        """Resume from the latest checkpoint in the run directory, if any and allowed."""
        if not self.cfg.training.resume:
            return False
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            return False
        state = ckpt.load_checkpoint(
            path, self.model_chunks, self.optimizer, seed=self.cfg.training.seed
        )
        self.scheduler.load_state_dict(state.scheduler)
        self.step, self.consumed_samples = state.step, state.consumed_samples
        self.releases = dict(state.extra.get("releases", {}))
        self.sharp_crossing = state.extra.get("sharp_crossing")
        return True

    def _event_records(self, events) -> list[dict]:
        records = []
        for ev in events:
            frac = ev.step / self.planned_steps
            self.releases[ev.rule] = {"step": ev.step, "frac": frac, "reason": ev.reason}
            # Maturity rules: the score and threshold in force at the release.
            at_release = {}
            if ev.threshold is not None:
                at_release = {k: getattr(ev, k) for k in ("score", "threshold", "threshold_mode")}
            self.releases[ev.rule].update(at_release)
            records.append(
                {
                    "kind": "release",
                    "rule": ev.rule,
                    "reason": ev.reason,
                    "step": ev.step,
                    "frac": frac,
                    "tokens": ev.step
                    * self.cfg.training.global_batch_size
                    * self.cfg.model.seq_length,
                    **at_release,
                }
            )
        return records

    def run(self) -> dict:
        """Train to the planned step (or ``exit_after_steps``) and return the summary."""
        cfg, info, t = self.cfg, self.info, self.cfg.training
        if info.is_logging_rank:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if t.resume:
                check_resume_compatible(self.run_dir, cfg)
            claim_run_dir(self.run_dir, cfg)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        resumed = self.maybe_resume()
        if resumed and self.step >= self.end_step:
            summary_path = self.run_dir / "summary.json"
            if summary_path.exists():
                logger.info("run in %s already finished; nothing to do", self.run_dir)
                return json.loads(summary_path.read_text(encoding="utf-8"))
        if info.is_logging_rank:
            if resumed:
                truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            elif (self.run_dir / "metrics.jsonl").exists():
                (self.run_dir / "metrics.jsonl").unlink()  # a fresh start replaces old lines
            write_config(self.run_dir, cfg, info.world_size)
        sinks = MetricsSinks(
            self.run_dir,
            enabled=info.is_logging_rank,
            tensorboard=cfg.logging.tensorboard,
            wandb_mode=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            run_name=f"{cfg.name}-{cfg.arm}-s{t.seed}",
            config_dict=config_to_dict(cfg),
        )
        bar = ProgressBar(
            info.is_logging_rank and cfg.logging.progress_bar,
            total=self.planned_steps,
            initial=self.step,
            desc=f"{cfg.name}/{cfg.arm}",
            log_lines=info.is_logging_rank,
        )
        if resumed:
            bar.write(f"resumed from step {self.step} ({self.consumed_samples} samples)")
        start_step = saved_at = self.step
        stop_at = self.end_step
        if t.exit_after_steps is not None:
            stop_at = min(stop_at, self.step + t.exit_after_steps)
        try:
            if self.step == 0 and t.eval_interval:
                self._evaluate_and_log(sinks, bar)
            while self.step < stop_at:
                self.profiler.before_step(self.step + 1)
                record = self.train_step()
                self.profiler.after_step(self.step)
                for rec in self._event_records(self.scheduler.pop_events()):
                    sinks.write(rec)
                if self.step % t.log_interval == 0 or self.step == stop_at:
                    sinks.write(record)
                bar.update(record["loss"], record["tokens_per_second"], record["lr"])
                is_last = self.step == self.end_step
                if is_last or (t.eval_interval and self.step % t.eval_interval == 0):
                    self._evaluate_and_log(sinks, bar)
                if checkpoint_plan.is_save_step(cfg, self.step) and self.step != stop_at:
                    self.save()
                    saved_at = self.step
                if self.preemption is not None:
                    saved_at = self._stop_if_preempted(sinks, bar, saved_at)
            if self.step > start_step and saved_at != self.step:
                self.save()
        finally:
            self.profiler.close()
            bar.close()
            sinks.close()
        if self.step == self.end_step and self.last_eval is None and t.eval_interval:
            # Resumed from the final checkpoint of a run killed before its summary was written.
            self.last_eval = self.evaluate()
        summary = self._summary()
        if info.is_logging_rank and self.step == self.end_step:
            write_summary(self.run_dir, summary)
        return summary

    def _stop_if_preempted(self, sinks: MetricsSinks, bar: ProgressBar, saved_at: int) -> int:
        """After a step: if any rank got SIGTERM/SIGUSR1, save, log the event and stop."""
        from megatron_qk.training.preemption import PreemptedError, preempted_record

        signal_name = self.preemption.poll(self.info.device)
        if signal_name is None or self.step >= self.planned_steps:
            return saved_at  # at the last step the run finishes (final save and summary)
        path = (
            self.save()
            if saved_at != self.step
            else latest_checkpoint(self.run_dir / "checkpoints")
        )
        tokens = self.consumed_samples * self.cfg.model.seq_length
        frac = self.step / self.planned_steps
        sinks.write(preempted_record(self.step, frac, tokens, signal_name, str(path)))
        bar.write(f"{signal_name}: saved {path} after step {self.step}; stopping")
        raise PreemptedError(self.step, signal_name, str(path))

    def _evaluate_and_log(self, sinks: MetricsSinks, bar: ProgressBar) -> None:
        record = self.evaluate()
        self.last_eval = record
        sinks.write(record)
        if self.last_diag is not None:
            diag = self.last_diag
            uniform = diag.get("lower_copy_uniform", math.nan)
            diag["maturity_score"] = self.scheduler.maturity_score(diag["lower_copy"], uniform)
            sinks.write(self.last_diag)
            crossing = self._sharp_crossing_record(self.last_diag)
            if crossing is not None:
                sinks.write(crossing)
                bar.write(
                    f"upper entropy {crossing['upper_entropy']:.3f} crossed the sharpness "
                    f"threshold {crossing['threshold']} at step {crossing['step']}"
                )
            self.scheduler.observe_evaluation(self.step, diag["lower_copy"], uniform)
            for rec in self._event_records(self.scheduler.pop_events()):
                sinks.write(rec)
                bar.write(f"release {rec['rule']} ({rec['reason']}) at step {rec['step']}")
        bar.write(
            f"step {self.step}/{self.planned_steps}: val_loss {record['val_loss']:.4f} "
            f"ppl {record['val_ppl']:.2f}"
        )

    def _sharp_crossing_record(self, diag: dict) -> dict | None:
        """The ``event`` line of the first evaluation whose upper entropy is below the threshold."""
        threshold = self.cfg.diagnostics.sharp_entropy_threshold
        if self.sharp_crossing is not None or not diag["upper_entropy"] < threshold:
            return None
        self.sharp_crossing = {"step": diag["step"], "frac": diag["frac"], "tokens": diag["tokens"]}
        return {
            "kind": "event",
            "event": "sharp_entropy_crossing",
            **self.sharp_crossing,
            "upper_entropy": diag["upper_entropy"],
            "threshold": threshold,
        }

    def _summary(self) -> dict:
        last = self.last_eval or {}
        return {
            "name": self.cfg.name,
            "arm": self.cfg.arm,
            "seed": self.cfg.training.seed,
            "steps": self.step,
            "planned_steps": self.planned_steps,
            "finished": self.step == self.planned_steps,
            "tokens": self.consumed_samples * self.cfg.model.seq_length,
            "final_val_loss": last.get("val_loss"),
            "final_val_ppl": last.get("val_ppl"),
            "release": dict(self.releases),
            "sharp_entropy_crossing": self.sharp_crossing,
            # Stopped on purpose at training.stop_at_frac (not finished, but complete).
            "stopped": self.step == self.end_step < self.planned_steps,
            "data_order": self.data_order,
        }
