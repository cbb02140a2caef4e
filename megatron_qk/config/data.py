"""Recipe section ``data.*``: Megatron indexed datasets (with blend weights) or a synthetic
stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_qk.config.errors import ConfigError


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
