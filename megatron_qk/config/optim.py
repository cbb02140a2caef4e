"""Recipe section ``optim.*``: AdamW and its schedule, the learning-rate multiplier rules (the
paper's intervention) and the entropy-floor control, both released by :class:`ReleaseConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_qk.config.errors import NOT_IDENTITY, ConfigError
from megatron_qk.config.release import ReleaseConfig

PARAM_ROLES = ("q", "k", "v", "o", "fc1", "fc2", "norm", "q_norm", "k_norm")
# Layer selections a rule may name instead of explicit ranges; their meaning (which global layer
# numbers are "upper") belongs to the model, which expands them.
LAYER_KEYWORDS = ("upper_half", "lower_half", "all")


def explicit_layers(spec: str, num_layers: int, where: str = "layers") -> frozenset[int]:
    """Global 1-based layer numbers named by explicit ranges such as ``"11-20,3"``.

    Args:
        spec: comma-separated numbers and inclusive ranges (not one of :data:`LAYER_KEYWORDS`).
        num_layers: total transformer layers of the model (all pipeline stages).
        where: the YAML path used in error messages.

    Raises:
        ConfigError: on a malformed spec or a layer outside ``1..num_layers``.
    """
    layers: set[int] = set()
    for part in spec.strip().split(","):
        part = part.strip()
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise ConfigError(
                where,
                f"{spec.strip()!r}: expected upper_half, lower_half, all or 1-based ranges like "
                "'11-20,3'",
            ) from None
        if not 1 <= lo <= hi <= num_layers:
            raise ConfigError(
                where, f"{spec.strip()!r}: {part!r} is outside layers 1..{num_layers}"
            )
        layers.update(range(lo, hi + 1))
    return frozenset(layers)


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
    # Parameter roles: any of q, k, v, o, fc1, fc2, norm, q_norm, k_norm (q/k/v need
    # model.split_qkv: true; q_norm/k_norm, the QK-norm weights, model.qk_layernorm: true).
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


@dataclass
class EntropyFloorConfig(ReleaseConfig):
    """Entropy-floor control: add ``lam * max(0, h0 - H_upper)`` during the early window.

    Released by the same maturity rule as the multiplier rules (:class:`ReleaseConfig`).
    """

    enabled: bool = False
    h0: float = 0.8
    lam: float = 0.1

    def __post_init__(self) -> None:
        # The values of an enabled floor (threshold, h0, lam, patience) are checked by the
        # training preflight, which reports every bad value of a recipe at once; here only the
        # spelling of the threshold mode.
        self.check_threshold_mode()


@dataclass
class QKClipConfig:
    """QK-clip (MuonClip): after each optimizer step, rescale W_Q/W_K of hot query groups.

    Megatron-Core's semantics (``SelfAttention.clip_qk``): each query group's max pre-softmax
    logit over the step (max over its heads, micro-batches and data-parallel ranks) gives
    ``eta = min(threshold / max_logit, 1)``; the group's W_Q rows are scaled by ``eta**alpha``
    and its W_K rows by ``eta**(1 - alpha)``, so the same inputs' logits shrink by ``eta``.
    """

    # Clip after every optimizer step (also logs ``max_attention_logit`` on train lines).
    enabled: bool = False
    # Log ``max_attention_logit`` on train lines without clipping (needs enabled: false). Not
    # part of the run's identity: it does not change the trained model.
    log_only: bool = field(default=False, metadata=NOT_IDENTITY)
    # Share of the rescale on W_Q (eta**alpha); W_K gets eta**(1 - alpha).
    alpha: float = 0.5
    # A query group is clipped when its max logit over the step exceeds this.
    threshold: float = 100.0
    # Layers clipped: "all", "upper_half", "lower_half", or 1-based ranges like "11-20,3".
    layers: str = "all"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("alpha", f"must be in [0, 1], got {self.alpha}")
        if not self.threshold > 0:
            raise ConfigError("threshold", f"must be > 0, got {self.threshold}")
        if self.enabled and self.log_only:
            raise ConfigError("log_only", "log_only logs without clipping: set enabled: false")
        if not self.layers.strip():
            raise ConfigError("layers", "must name layers (all, upper_half, lower_half, ranges)")

    @property
    def collects(self) -> bool:
        """Whether the max attention logit is collected and logged (clipping or log_only)."""
        return self.enabled or self.log_only


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
    # QK-clip (MuonClip-style) after each optimizer step, or max-logit logging alone.
    qk_clip: QKClipConfig = field(default_factory=QKClipConfig)

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
