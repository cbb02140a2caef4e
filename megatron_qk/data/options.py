"""Options of ``megatron-qk preprocess`` as a dataclass (the library-level configuration)."""

from __future__ import annotations

import dataclasses

from megatron_qk.data.encode import BACKENDS
from megatron_qk.data.readers import HubDataset
from megatron_qk.data.sharding import parse_shard
from megatron_qk.data.workers import usable_cpus


def default_workers() -> int:
    """CPUs this process may use (affinity and cgroup CPU quota)."""
    return usable_cpus()[0]


@dataclasses.dataclass
class PreprocessConfig:
    """Options of ``megatron-qk preprocess`` (see its ``--help`` for each)."""

    output_prefix: str
    inputs: list[str] = dataclasses.field(default_factory=list)
    hf: HubDataset | None = None
    tokenizer: str = "gpt2"
    text_key: str = "text"
    id_key: str = "id"
    min_int_score: float | None = None
    valid_fraction: float = 0.0
    split_by: str = "text"
    split_seed: int = 0
    max_docs: int | None = None
    max_tokens: int | None = None
    strict: bool = False
    workers: int = dataclasses.field(default_factory=default_workers)
    backend: str = "auto"
    shard_size: int = 100_000
    chunk_bytes: int = 1 << 19
    overwrite: bool = False
    progress: bool = True
    shard: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending option."""
        if bool(self.inputs) == (self.hf is not None):
            raise ValueError("give exactly one of --input and --hf-dataset")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        for name in ("max_docs", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.shard is not None:
            parse_shard(self.shard)
            for name in ("max_docs", "max_tokens"):
                if getattr(self, name) is not None:
                    flag = f"--{name.replace('_', '-')}"
                    raise ValueError(
                        f"{flag} cannot be combined with --shard (each shard would stop on its "
                        "own count); limit the single job, or shard fewer files"
                    )
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.split_by not in ("text", "id"):
            raise ValueError(f"--split-by must be 'text' or 'id', got {self.split_by!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
