"""Typed configuration schema: one dataclass per recipe section.

The dataclasses are the schema. ``megatron_qk.config.loader`` builds them strictly from YAML (an
unknown key, a wrong type or an inconsistent value is an error naming the YAML path). Each field's
comment documents its YAML key.

Local checks live in ``__post_init__`` and raise :class:`ConfigError` with the path relative to the
section; the loader prefixes the section path. Checks that need several sections or the world size
live in :meth:`ExperimentConfig.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.release import ReleaseConfig

FFN_VARIANTS = ("gelu", "swiglu", "geglu")
NORM_VARIANTS = ("layernorm", "rmsnorm")


@dataclass
class ModelConfig:
    """Decoder architecture (Megatron-Core GPTModel built from layer specs)."""

    # Number of transformer layers.
    num_layers: int = 2
    # Model width.
    hidden_size: int = 64
    # Attention heads.
    num_attention_heads: int = 4
    # Key/value groups for GQA; null means one group per head (MHA).
    num_query_groups: int | None = None
    # Feed-forward network: gelu (single branch), swiglu or geglu (gated; GEGLU uses exact GELU).
    ffn: Literal["gelu", "swiglu", "geglu"] = "gelu"
    # FFN hidden width (per branch for gated FFNs). Paper: GELU 3840, gated 2560.
    ffn_hidden_size: int = 256
    # Normalization: layernorm or rmsnorm.
    normalization: Literal["layernorm", "rmsnorm"] = "layernorm"
    # Biases on the attention and FFN linear layers.
    bias: bool = True
    # Training sequence length (also the RoPE/positional range).
    seq_length: int = 64
    # Tokenizer vocabulary size; padded up to a multiple of ``vocab_pad_multiple * TP``.
    vocab_size: int = 50257
    # Padding multiple for the embedding table (Megatron's make-vocab-size-divisible-by).
    vocab_pad_multiple: int = 128
    # RoPE base frequency.
    rotary_base: int = 10000
    # Tie input embedding and output projection.
    tie_embeddings: bool = True
    # Standard deviation of the normal weight initialisation.
    init_method_std: float = 0.02
    # Dropout after attention/FFN (residual) and on attention probabilities.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Norm epsilon.
    norm_epsilon: float = 1e-5
    # Layer implementation: auto (TE when importable and on GPU, else local), local, or te.
    impl: Literal["auto", "local", "te"] = "auto"
    # Give W_Q, W_K, W_V their own parameters (needed to give Q/K their own learning rate).
    # The split projection re-emits Megatron's fused layout, so the model is the same function.
    split_qkv: bool = True
    # Fused bias+activation kernels. Fused GELU/GEGLU use the tanh approximation, unfused exact
    # erf: keep this identical across compared arms. Off on CPU (needs torch.compile).
    bias_activation_fusion: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.seq_length <= 1:
            raise ConfigError("seq_length", f"must be > 1, got {self.seq_length}")
        if self.vocab_size <= 0:
            raise ConfigError("vocab_size", f"must be positive, got {self.vocab_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}",
            )
        groups = self.query_groups
        if groups <= 0 or self.num_attention_heads % groups:
            raise ConfigError(
                "num_query_groups",
                f"{groups} must divide num_attention_heads {self.num_attention_heads}",
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("hidden_size", "head dimension must be even for RoPE")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.bias_activation_fusion and self.ffn == "gelu" and not self.bias:
            raise ConfigError(
                "bias_activation_fusion", "fused GELU needs bias: true (Megatron's bias_gelu)"
            )

    @property
    def query_groups(self) -> int:
        """Number of key/value groups (heads when ``num_query_groups`` is null)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head channel count (Megatron's ``kv_channels``)."""
        return self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    """Megatron parallel layout. Data-parallel size = world size / (TP x PP)."""

    # Tensor-model-parallel size.
    tensor_model_parallel_size: int = 1
    # Pipeline-model-parallel size.
    pipeline_model_parallel_size: int = 1
    # Sequence parallelism (requires TP > 1 and a GPU).
    sequence_parallel: bool = False
    # Shard optimizer state over data-parallel ranks (Megatron DistributedOptimizer).
    use_distributed_optimizer: bool = False
    # Overlap the gradient reduce-scatter/all-reduce with backward (bucketed).
    overlap_grad_reduce: bool = False
    # Overlap the parameter all-gather with forward (distributed optimizer only).
    overlap_param_gather: bool = False
    # Communication backend; auto = nccl with CUDA, gloo otherwise.
    backend: Literal["auto", "nccl", "gloo"] = "auto"

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("sequence_parallel", "needs tensor_model_parallel_size > 1")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("overlap_param_gather", "needs use_distributed_optimizer: true")


@dataclass
class MultiplierRuleConfig(ReleaseConfig):
    """One named learning-rate multiplier rule (the paper's intervention is one such rule).

    Released by the maturity rule of :class:`ReleaseConfig` (``release: maturity``), at a fixed
    fraction, or never.
    """

    # Rule name; appears as ``mult/<name>`` in metrics.jsonl.
    name: str = "upper_qk"
    # Layers: "upper_half", "lower_half", "all", or explicit 1-based global ranges like "11-20,3".
    layers: str = "upper_half"
    # Parameter roles: any of q, k, v, o, fc1, fc2, norm (q/k/v need model.split_qkv: true).
    roles: list[str] = field(default_factory=lambda: ["q", "k"])
    # Learning-rate multiplier during the hold.
    multiplier: float = 0.25
    # Release policy: maturity (lower-copy score), fixed (at ``release_frac``), never.
    release: Literal["maturity", "fixed", "never"] = "maturity"
    # (The maturity rule's fields, threshold ... threshold_ratio, come from ReleaseConfig.)
    # Fixed release point (fraction of planned training steps), for release: fixed.
    release_frac: float | None = None
    # Linear ramp from the multiplier back to 1.0 over this fraction of total steps.
    ramp_frac: float = 0.01
    # Also slow the biases of the selected linear layers (roles q k v o fc1 fc2). The paper
    # slows "W_Q and W_K", the weights, so the default leaves their biases at the full rate.
    biases: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError("name", f"must be a non-empty identifier, got {self.name!r}")
        if self.multiplier < 0:
            raise ConfigError("multiplier", f"must be >= 0, got {self.multiplier}")
        bad = sorted(set(self.roles) - set(PARAM_ROLES))
        if not self.roles or bad:
            raise ConfigError("roles", f"unknown roles {bad}; choose from {list(PARAM_ROLES)}")
        self.check_release()
        if not 0.0 <= self.ramp_frac <= 1.0:
            raise ConfigError("ramp_frac", f"must be in [0, 1], got {self.ramp_frac}")
        if self.release == "fixed":
            if self.release_frac is None or not 0.0 <= self.release_frac <= 1.0:
                raise ConfigError("release_frac", "release: fixed needs release_frac in [0, 1]")
        elif self.release_frac is not None:
            raise ConfigError("release_frac", f"only used with release: fixed ({self.release})")


PARAM_ROLES = ("q", "k", "v", "o", "fc1", "fc2", "norm")


@dataclass
class EntropyFloorConfig(ReleaseConfig):
    """Entropy-floor control: add ``lam * max(0, h0 - H_upper)`` during the early window.

    Released by the same maturity rule as the multiplier rules (:class:`ReleaseConfig`).
    """

    enabled: bool = False
    h0: float = 0.8
    lam: float = 0.1

    def __post_init__(self) -> None:
        if not self.enabled:
            # A disabled floor's values are never used; only their spelling is checked.
            self.check_threshold_mode()
            return
        self.check_release()
        if self.lam < 0:
            raise ConfigError("lam", f"must be >= 0, got {self.lam}")


@dataclass
class OptimConfig:
    """AdamW, warmup + cosine schedule, clipping, and the learning-rate multiplier rules."""

    # Peak learning rate.
    lr: float = 2.5e-4
    # Final learning rate as a fraction of the peak (paper: cosine to 10%).
    min_lr_ratio: float = 0.1
    # Warmup length as a fraction of the planned steps (paper: 2%).
    warmup_frac: float = 0.02
    # Decay style after warmup.
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Global gradient-norm clipping (0 disables).
    clip_grad: float = 1.0
    # Global learning-rate multiplier (the paper's 0.5x control); scales lr and min lr.
    lr_multiplier: float = 1.0
    # Named multiplier rules on parameter groups (empty: the control arm).
    rules: list[MultiplierRuleConfig] = field(default_factory=list)
    # Entropy-floor control.
    entropy_floor: EntropyFloorConfig = field(default_factory=EntropyFloorConfig)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError("warmup_frac", f"must be in [0, 1), got {self.warmup_frac}")
        if self.lr_multiplier <= 0:
            raise ConfigError("lr_multiplier", f"must be positive, got {self.lr_multiplier}")
        if self.clip_grad < 0:
            raise ConfigError("clip_grad", f"must be >= 0, got {self.clip_grad}")
        names = [r.name for r in self.rules]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"rules[{i}].name", f"duplicate rule name {name!r}")


@dataclass
class DataConfig:
    """Training/validation data: Megatron indexed datasets or a synthetic stream."""

    # synthetic: generated token sequences (smoke tests); indexed: .bin/.idx prefixes.
    kind: Literal["synthetic", "indexed"] = "synthetic"
    # Training dataset prefix(es) (without _text_document suffix handling: give the full prefix
    # passed to Megatron, e.g. data/fineweb_text_document).
    train_prefixes: list[str] = field(default_factory=list)
    # Validation prefix(es). When empty, ``split`` carves validation out of the training prefixes.
    valid_prefixes: list[str] = field(default_factory=list)
    # Megatron split string "train,valid,test" used when valid_prefixes is empty.
    split: str = "98,2,0"
    # Where GPTDataset caches its index files; null = <output_dir>/data_cache.
    cache_dir: str | None = None
    # Synthetic data: "repeat" (a short random motif repeated, learnable) or "random".
    synthetic_pattern: Literal["repeat", "random"] = "repeat"
    # Synthetic data: number of distinct token ids used.
    synthetic_vocab: int = 64
    # Scan every token id of the indexed data against model.vocab_size before training (streams
    # the .bin once; turn off only for trusted corpora too large to scan at each launch).
    check_token_ids: bool = True
    # Blend weights, one per train_prefixes / valid_prefixes entry (Megatron's
    # "weight prefix weight prefix" data path as two aligned lists); empty = unweighted.
    # Samples are drawn by megatron-core's BlendedDataset, deterministic under training.data_seed.
    train_weights: list[float] = field(default_factory=list)
    valid_weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind == "indexed" and not self.train_prefixes:
            raise ConfigError("train_prefixes", "data.kind: indexed needs at least one prefix")
        parts = self.split.split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(
                "split", f"expected 'train,valid,test' numbers, got {self.split!r}"
            ) from None
        if len(weights) != 3 or any(w < 0 for w in weights) or weights[0] <= 0:
            raise ConfigError("split", f"expected three non-negative weights, got {self.split!r}")
        if self.kind == "indexed" and not self.valid_prefixes and weights[1] <= 0:
            raise ConfigError("split", "no validation data: set valid_prefixes or a valid share")
        for name, prefixes in (("train", self.train_prefixes), ("valid", self.valid_prefixes)):
            blend = getattr(self, f"{name}_weights")
            if blend and len(blend) != len(prefixes):
                raise ConfigError(
                    f"{name}_weights",
                    f"{len(blend)} weights for {len(prefixes)} {name}_prefixes (one per prefix)",
                )
            if any(w <= 0 for w in blend):
                raise ConfigError(f"{name}_weights", f"weights must be positive, got {blend}")


@dataclass
class TrainingConfig:
    """Run length, batch geometry, evaluation, checkpointing."""

    # Global batch in sequences (paper: 512 x 1024 = 524,288 tokens).
    global_batch_size: int = 8
    # Sequences per micro-batch per data-parallel rank.
    micro_batch_size: int = 4
    # Planned optimizer steps; alternatively give train_tokens (exactly one of the two).
    train_steps: int | None = None
    train_tokens: int | None = None
    # Evaluate every N steps (0 disables periodic evaluation; a final evaluation always runs).
    eval_interval: int = 20
    # Validation batches (of global_batch_size sequences) per evaluation.
    eval_iters: int = 2
    # Save a checkpoint every N steps (0: only at the end).
    save_interval: int = 0
    # Random seed (model init, data order, dropout).
    seed: int = 1234
    # Numeric precision: auto = bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Run directory (config.yaml, metrics.jsonl, checkpoints/, tensorboard/, summary.json).
    output_dir: str = "runs/default"
    # Resume from the latest checkpoint in output_dir/checkpoints when one exists.
    resume: bool = True
    # Stop after this many steps in this invocation (for chunked jobs); null = run to the end.
    exit_after_steps: int | None = None
    # Log a train line every N steps.
    log_interval: int = 1
    # Write a torch.profiler trace of these optimizer steps [first, last] (1-based, inclusive)
    # to <output_dir>/profile/; null = no profiling.
    profile_steps: list[int] | None = None
    # Global ranks that write a trace when profile_steps is set.
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    # Extra checkpoints at these fractions of the planned steps (each rounded to the nearest
    # step, at least 1), e.g. [0.03, 0.2] for the paper's 3% and 20% readouts. Written once and
    # never removed by ``keep_interval_checkpoints``.
    save_at_fracs: list[float] = field(default_factory=list)
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
    keep_interval_checkpoints: int = 0

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
        if self.stop_at_frac is not None and not 0.0 < self.stop_at_frac <= 1.0:
            raise ConfigError("stop_at_frac", f"must be in (0, 1], got {self.stop_at_frac}")
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


@dataclass
class ExperimentConfig:
    """A whole recipe."""

    # Recipe name (free text, recorded in summary.json).
    name: str = "default"
    # Arm label used by ``megatron-qk compare`` to group runs (e.g. control, intervention).
    arm: str = "control"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def __post_init__(self) -> None:
        m, p = self.model, self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if m.num_attention_heads % tp:
            raise ConfigError(
                "parallel.tensor_model_parallel_size",
                f"TP={tp} does not divide model.num_attention_heads={m.num_attention_heads}",
            )
        if m.query_groups % tp:
            raise ConfigError(
                "parallel.tensor_model_parallel_size",
                f"TP={tp} does not divide the {m.query_groups} query groups "
                "(model.num_query_groups)",
            )
        if m.ffn_hidden_size % tp:
            raise ConfigError(
                "parallel.tensor_model_parallel_size",
                f"TP={tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}",
            )
        if m.num_layers % pp:
            raise ConfigError(
                "parallel.pipeline_model_parallel_size",
                f"PP={pp} does not divide model.num_layers={m.num_layers}",
            )
        t = self.training
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(
                "training.global_batch_size",
                f"{t.global_batch_size} is not divisible by training.micro_batch_size "
                f"{t.micro_batch_size}",
            )
        needs_maturity = any(r.release == "maturity" for r in self.optim.rules)
        if (needs_maturity or self.optim.entropy_floor.enabled) and t.eval_interval == 0:
            raise ConfigError(
                "training.eval_interval",
                "maturity release reads the lower-copy score at evaluations: must be > 0",
            )
        if self.optim.rules and not m.split_qkv:
            for i, rule in enumerate(self.optim.rules):
                if set(rule.roles) & {"q", "k", "v"}:
                    raise ConfigError(
                        f"optim.rules[{i}].roles",
                        "q/k/v roles need model.split_qkv: true (the fused QKV weight would "
                        "slow V too)",
                    )

    def validate_world(self, world_size: int) -> None:
        """Check the checks that need the number of processes (before any process group).

        Raises:
            ConfigError: when TP x PP does not divide the world size or the global batch is not
                divisible by micro-batch x data-parallel size.
        """
        tp = self.parallel.tensor_model_parallel_size
        pp = self.parallel.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(
                "parallel",
                f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}",
            )
        dp = world_size // (tp * pp)
        t = self.training
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                "training.global_batch_size",
                f"{t.global_batch_size} is not divisible by micro_batch_size x data-parallel size "
                f"= {t.micro_batch_size} x {dp}",
            )

    def tokens_per_step(self) -> int:
        """Tokens one optimizer step consumes: global batch size x sequence length."""
        return self.training.global_batch_size * self.model.seq_length

    def planned_steps(self) -> int:
        """Planned optimizer steps (from train_steps or train_tokens, rounded up)."""
        t = self.training
        if t.train_steps is not None:
            return t.train_steps
        return -(-t.train_tokens // self.tokens_per_step())
