"""The maturity release rule's settings and the paper's values for them, written once.

The multiplier rules (:class:`~megatron_qk.config.optim.MultiplierRuleConfig`) and the entropy
floor (:class:`~megatron_qk.config.optim.EntropyFloorConfig`) both end their early window with
this rule, so both inherit these fields (their YAML keys stay flat: ``optim.rules[0].threshold``,
``optim.entropy_floor.patience``). ``optim.release.ReleaseController`` and the
``replay-release`` tool take their defaults from :data:`PAPER_RELEASE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_qk.config.errors import ConfigError

ThresholdMode = Literal["absolute", "over_uniform"]


@dataclass
class ReleaseConfig:
    """When a slowed early window ends: the lower-copy maturity rule (paper, Appendix F).

    The lower-copy score must be ``>= threshold`` for ``patience`` consecutive evaluations inside
    ``[min_frac, max_frac]`` of the planned steps; the release is forced at ``max_frac``.
    """

    # Maturity rule: lower-copy score >= threshold for ``patience`` consecutive evaluations inside
    # [min_frac, max_frac]; forced at max_frac.
    threshold: float = 0.005
    patience: int = 3
    min_frac: float = 0.03
    max_frac: float = 0.12
    # Maturity score: "absolute" compares the lower-copy score with ``threshold`` (the paper's,
    # calibrated at sequence length 1024); "over_uniform" compares lower_copy / lower_copy_uniform
    # (its value under uniform causal attention on the same positions) with ``threshold_ratio``,
    # which means the same at any sequence length.
    threshold_mode: ThresholdMode = "absolute"
    threshold_ratio: float | None = None

    def check_release(self) -> None:
        """Check the maturity settings (paths relative to the section that holds them).

        Raises:
            ConfigError: ``patience < 1`` or a window outside [0, 1]. (A negative threshold is
            reported by the training preflight, which lists every bad value at once.)
        """
        if self.patience < 1:
            raise ConfigError("patience", f"must be >= 1, got {self.patience}")
        if not 0.0 <= self.min_frac <= self.max_frac <= 1.0:
            raise ConfigError("min_frac", "need 0 <= min_frac <= max_frac <= 1")
        self.check_threshold_mode()

    def check_threshold_mode(self) -> None:
        """Check that ``threshold_ratio`` is given exactly when ``over_uniform`` needs it.

        Raises:
            ConfigError: an unknown mode, or a ratio missing or given for the wrong mode.
        """
        mode, ratio = self.threshold_mode, self.threshold_ratio
        if mode not in ("absolute", "over_uniform"):
            raise ConfigError("threshold_mode", f"must be absolute or over_uniform, got {mode!r}")
        if mode == "over_uniform" and (ratio is None or not ratio > 0):
            raise ConfigError(
                "threshold_ratio", f"threshold_mode over_uniform needs a ratio > 0 ({ratio})"
            )
        if mode == "absolute" and ratio is not None:
            raise ConfigError("threshold_ratio", "only used with threshold_mode: over_uniform")


# The paper's rule: threshold 0.005, patience 3, window 3%-12% (Appendix F).
PAPER_RELEASE = ReleaseConfig()
