"""Recipe sections of a run: length and batch geometry (``training.*``), logging (``logging.*``)
and the mechanism probes (``diagnostics.*``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_qk.config.errors import NOT_IDENTITY, ConfigError


@dataclass
class TrainingConfig:
    """Run length, batch geometry, evaluation, checkpointing.

    Fields marked ``NOT_IDENTITY`` (where the run lives, how it is chunked, logged and which
    checkpoints are kept) do not change the trained model: they are left out of the run's
    identity hash (:mod:`megatron_qk.config.identity`).
    """

    # Global batch in sequences (paper: 512 x 1024 = 524,288 tokens).
    global_batch_size: int = 8
    # Sequences per micro-batch per data-parallel rank.
    micro_batch_size: int = 4
    # Planned optimizer steps; alternatively give train_tokens (exactly one of the two).
    train_steps: int | None = None
    train_tokens: int | None = None
    # Evaluate every N steps (0 disables periodic evaluation; a final evaluation always runs).
    eval_interval: int = 20
    # Evaluate at round(k x eval_interval_frac x planned steps), k = 1, 2, ... (halves up), the
    # paper's grid with 0.005: steps 143, 191, 238, 262 of 4769 are 3.00/4.01/4.99/5.49%
    # (Table 8). Set, it replaces eval_interval's grid; null = every eval_interval steps.
    eval_interval_frac: float | None = None
    # Validation batches (of global_batch_size sequences) per evaluation.
    eval_iters: int = 2
    # Save a checkpoint every N steps (0: only at the end).
    save_interval: int = field(default=0, metadata=NOT_IDENTITY)
    # Random seed (model init, data order, dropout).
    seed: int = 1234
    # Numeric precision: auto = bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Run directory (config.yaml, metrics.jsonl, checkpoints/, tensorboard/, summary.json).
    output_dir: str = field(default="runs/default", metadata=NOT_IDENTITY)
    # Resume from the latest checkpoint in output_dir/checkpoints when one exists.
    resume: bool = field(default=True, metadata=NOT_IDENTITY)
    # Stop after this many steps in this invocation (for chunked jobs); null = run to the end.
    exit_after_steps: int | None = field(default=None, metadata=NOT_IDENTITY)
    # Log a train line every N steps.
    log_interval: int = field(default=1, metadata=NOT_IDENTITY)
    # Write a torch.profiler trace of these optimizer steps [first, last] (1-based, inclusive)
    # to <output_dir>/profile/; null = no profiling.
    profile_steps: list[int] | None = None
    # Global ranks that write a trace when profile_steps is set.
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    # Extra checkpoints at these fractions of the planned steps (each rounded to the nearest
    # step, at least 1), e.g. [0.03, 0.2] for the paper's 3% and 20% readouts. Written once and
    # never removed by ``keep_interval_checkpoints``.
    save_at_fracs: list[float] = field(default_factory=list, metadata=NOT_IDENTITY)
    # Seed of the training sample order and of the validation subset. Independent of ``seed``
    # (initialisation, dropout) so every seed of a recipe reads the same data in the same order
    # (paper, Appendix H: "All runs use the same data order").
    data_seed: int = 1234
    # Stop for good at this fraction of the planned steps (absolute, unlike exit_after_steps):
    # the schedule is the full run's, summary.json is written with ``stopped: true``. Table 5
    # trains to 20% of the budget. null = run to the end.
    stop_at_frac: float | None = None
    # Keep only the newest N interval checkpoints (0 = keep all). Checkpoints at
    # ``save_at_fracs`` and the final one are never removed.
    keep_interval_checkpoints: int = field(default=0, metadata=NOT_IDENTITY)
    # Warm start (torchtitan's checkpoint.initial_load_path, nanoGPT's init_from): a checkpoint
    # or run directory whose weights the run starts from; the optimizer, the step, the data
    # position and the schedule start fresh. Its model settings must be this recipe's. A resume
    # from the run's own checkpoint takes precedence. null = train from initialisation.
    init_checkpoint: str | None = None

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "micro_batch_size", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_interval", "save_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if (self.train_steps is None) == (self.train_tokens is None):
            raise ConfigError("train_steps", "set exactly one of train_steps and train_tokens")
        if self.train_steps is not None and self.train_steps < 1:
            raise ConfigError("train_steps", f"must be >= 1, got {self.train_steps}")
        if self.train_tokens is not None and self.train_tokens < 1:
            raise ConfigError("train_tokens", f"must be >= 1, got {self.train_tokens}")
        if self.profile_steps is not None:
            steps = self.profile_steps
            if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
                raise ConfigError(
                    "profile_steps", f"must be [first, last] with 1 <= first <= last, got {steps}"
                )
        for i, frac in enumerate(self.save_at_fracs):
            if not 0.0 < frac <= 1.0:
                raise ConfigError(f"save_at_fracs[{i}]", f"must be in (0, 1], got {frac}")
        if self.eval_interval_frac is not None and not 0.0 < self.eval_interval_frac <= 1.0:
            raise ConfigError(
                "eval_interval_frac", f"must be in (0, 1], got {self.eval_interval_frac}"
            )
        if self.stop_at_frac is not None and not 0.0 < self.stop_at_frac <= 1.0:
            raise ConfigError("stop_at_frac", f"must be in (0, 1], got {self.stop_at_frac}")
        if self.init_checkpoint is not None and not str(self.init_checkpoint).strip():
            raise ConfigError("init_checkpoint", "must be a checkpoint path or null, got ''")
        if self.keep_interval_checkpoints < 0:
            raise ConfigError(
                "keep_interval_checkpoints", f"must be >= 0, got {self.keep_interval_checkpoints}"
            )


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl."""

    tensorboard: bool = True
    # Weights & Biases: disabled, offline (no network) or online.
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "megatron-qk"
    # Rank-0 progress bar (loss, tokens/s, ETA) on stderr.
    progress_bar: bool = True
    # Dense bf16 peak of one GPU in TFLOP/s, the denominator of the logged MFU (H100/H200 SXM:
    # 989; see docs/THROUGHPUT.md).
    peak_tflops_per_gpu: float = 989.0

    def __post_init__(self) -> None:
        if not self.peak_tflops_per_gpu > 0:
            raise ConfigError("peak_tflops_per_gpu", f"must be > 0, got {self.peak_tflops_per_gpu}")


@dataclass
class DiagnosticsConfig:
    """Mechanism probes computed at every evaluation on a fixed held-out batch."""

    enabled: bool = True
    # Held-out sequences used by the probes.
    num_sequences: int = 4
    # Query rows per chunk when recomputing attention (bounds memory at long sequences).
    chunk_size: int = 256
    # Upper-entropy threshold of the "sharp-entropy crossing" event. Derived from the paper
    # (docs/REPRODUCTION.md): the intervention crosses at ~20% with entropy 0.729 there and
    # 0.966 at 3%, so the threshold lies in (0.729, 0.966); 0.8 is the paper's own entropy-floor
    # level h0 (Appendix D).
    sharp_entropy_threshold: float = 0.8
