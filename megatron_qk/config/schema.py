"""Typed configuration schema: :class:`ExperimentConfig`, a whole recipe, one dataclass per section.

The dataclasses are the schema: ``model.py`` (model, parallel), ``optim.py`` (optim, its rules and
entropy floor, released by ``release.py``), ``data.py`` and ``training.py`` (training, logging,
diagnostics). ``megatron_qk.config.loader`` builds them strictly from YAML (an unknown key, a wrong
type or an inconsistent value is an error naming the YAML path). Each field's comment documents
its YAML key.

Local checks live in each section's ``__post_init__`` and raise :class:`ConfigError` with the path
relative to the section; the loader prefixes the section path. Checks that need several sections
live in :meth:`ExperimentConfig.__post_init__`, those that need the world size in
:meth:`ExperimentConfig.validate_world`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_qk.config.data import DataConfig
from megatron_qk.config.errors import NOT_IDENTITY, ConfigError
from megatron_qk.config.model import ModelConfig, ParallelConfig
from megatron_qk.config.optim import LAYER_KEYWORDS, OptimConfig, explicit_layers
from megatron_qk.config.training import DiagnosticsConfig, LoggingConfig, TrainingConfig


@dataclass
class ExperimentConfig:
    """A whole recipe."""

    # Recipe name (free text, recorded in summary.json).
    name: str = field(default="default", metadata=NOT_IDENTITY)
    # Arm label used by ``megatron-qk compare`` to group runs (e.g. control, intervention).
    arm: str = "control"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # Where metrics go besides metrics.jsonl: not part of the run identity.
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=NOT_IDENTITY)
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
        periodic = t.eval_interval > 0 or t.eval_interval_frac is not None
        if (needs_maturity or self.optim.entropy_floor.enabled) and not periodic:
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
        for i, rule in enumerate(self.optim.rules):
            if set(rule.roles) & {"q_norm", "k_norm"} and not m.qk_layernorm:
                raise ConfigError(
                    f"optim.rules[{i}].roles",
                    "q_norm/k_norm roles need model.qk_layernorm: true (without QK-norm the "
                    "rule would select no parameter)",
                )
        self._check_qk_clip()

    def _check_qk_clip(self) -> None:
        clip = self.optim.qk_clip
        if not clip.collects:
            return
        if clip.layers.strip() not in LAYER_KEYWORDS:
            explicit_layers(clip.layers, self.model.num_layers, "optim.qk_clip.layers")
        if clip.enabled and self.model.qk_layernorm:
            raise ConfigError(
                "optim.qk_clip.enabled",
                "QK-clip with model.qk_layernorm: true does nothing: the norms after W_Q/W_K undo "
                "any rescaling of them, so the logits cannot be bounded that way (use log_only "
                "to log the max logit)",
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
