"""Training and validation data: Megatron indexed datasets or a synthetic stream.

Both kinds are map-style datasets indexed by a global sample number, so the data position of a
run is one integer (``consumed_samples``) and a resumed run sees exactly the samples an
uninterrupted run would. Micro-batches are cut from the global batch the way Megatron's
``MegatronPretrainingSampler`` does: for micro-batch ``m`` of a step, data-parallel rank ``r``
takes samples ``consumed + m * mbs * dp + r * mbs + [0, mbs)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.data.data_summary import check_data_tokenizer
from megatron_qk.data.tokenizer import EOD_TOKEN_ID
from megatron_qk.training.data_cache import prepare_cache_dir

logger = logging.getLogger(__name__)


class SyntheticDataset(torch.utils.data.Dataset):
    """Deterministic synthetic sequences for smoke tests and the CPU test suite.

    ``repeat``: each sample is a random motif (length 4-16, ids < ``vocab``) repeated to fill the
    sequence: learnable by copying from the previous occurrence, so loss falls fast and the
    lower-copy score has repeated tokens to measure. ``random``: i.i.d. uniform ids.
    """

    def __init__(self, seq_length: int, vocab: int, pattern: str, seed: int, num_samples: int):
        self.seq_length = seq_length
        self.vocab = vocab
        self.pattern = pattern
        self.seed = seed
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(idx)])
        n = self.seq_length + 1
        if self.pattern == "repeat":
            motif = rng.integers(0, self.vocab, size=int(rng.integers(4, 17)))
            seq = np.resize(motif, n)
        else:
            seq = rng.integers(0, self.vocab, size=n)
        tokens = torch.from_numpy(seq.astype(np.int64))
        return {"tokens": tokens[:-1], "labels": tokens[1:]}


class _TokenizerShim:
    """The few tokenizer attributes GPTDataset reads (EOD from the data summary, else GPT-2's)."""

    def __init__(self, vocab_size: int, eod: int = EOD_TOKEN_ID):
        self.eod = eod
        self.pad = -1
        self.vocab_size = vocab_size
        self.unique_identifiers = {"class": "GPT2BPE-tiktoken", "vocab_size": vocab_size}


def _document_count(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix in (".idx", ".bin"):
        if not Path(prefix + suffix).exists():
            raise ConfigError(
                "data", f"dataset file {prefix + suffix} does not exist (prefix {prefix!r})"
            )
    return len(IndexedDataset(prefix).document_indices) - 1


def check_split_nonempty(prefixes: list[str], split: str, field_path: str) -> None:
    """Refuse a split whose requested share receives no documents.

    GPTDataset loops forever on a split that exists but holds zero documents (megatron-core
    0.16.1 ``gpt_dataset.py:617-637``), so this runs before any dataset is built.

    Raises:
        ConfigError: naming the prefix and the empty split.
    """
    weights = [float(x) for x in split.split(",")]
    total = sum(weights)
    bounds = np.cumsum([0.0] + [w / total for w in weights])
    for prefix in prefixes:
        docs = _document_count(prefix)
        # Same rounding as megatron's _get_split_indices / BlendedMegatronDatasetBuilder.
        idx = [0] + [int(round(b * docs)) for b in bounds[1:]]
        for name, w, lo, hi in zip(("train", "valid", "test"), weights, idx[:-1], idx[1:]):
            if w > 0 and hi - lo <= 0:
                raise ConfigError(
                    field_path,
                    f"split {split!r} gives the {name} share of {prefix} ({docs} documents) zero "
                    "documents; use more data, a larger share, or separate valid_prefixes",
                )


def _build_gpt_datasets(cfg: ExperimentConfig, sizes: list[int], cache_dir: str) -> list:
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d = cfg.data
    eod = check_data_tokenizer(cfg)
    common = dict(
        random_seed=cfg.training.data_seed,  # sample order: the same for every training.seed
        sequence_length=cfg.model.seq_length,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        tokenizer=_TokenizerShim(cfg.model.vocab_size, EOD_TOKEN_ID if eod is None else eod),
        path_to_cache=cache_dir,
    )
    if d.valid_prefixes:
        for prefix in d.train_prefixes + d.valid_prefixes:
            _document_count(prefix)
        config = GPTDatasetConfig(
            blend_per_split=[
                (list(d.train_prefixes), list(d.train_weights) or None),
                (list(d.valid_prefixes), list(d.valid_weights) or None),
                None,
            ],
            **common,
        )
    else:
        check_split_nonempty(d.train_prefixes, d.split, "data.split")
        blend = (list(d.train_prefixes), list(d.train_weights) or None)
        config = GPTDatasetConfig(blend=blend, split=d.split, **common)
    sizes3 = [sizes[0], sizes[1], 0]
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes3, lambda: True, config).build()


@dataclass
class Datasets:
    """Map-style train and validation datasets indexed by global sample number."""

    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset


def build_datasets(cfg: ExperimentConfig, planned_steps: int, output_dir: str) -> Datasets:
    """Build the train/valid datasets for a run (collective when torch.distributed is up)."""
    t = cfg.training
    train_samples = planned_steps * t.global_batch_size
    valid_samples = t.eval_iters * t.global_batch_size
    if cfg.data.kind == "synthetic":
        if cfg.data.synthetic_vocab > cfg.model.vocab_size:
            raise ConfigError("data.synthetic_vocab", "must not exceed model.vocab_size")
        d = cfg.data
        train = SyntheticDataset(
            cfg.model.seq_length, d.synthetic_vocab, d.synthetic_pattern, t.data_seed, train_samples
        )
        # A different seed stream keeps validation samples disjoint from training samples.
        valid = SyntheticDataset(
            cfg.model.seq_length,
            d.synthetic_vocab,
            d.synthetic_pattern,
            t.data_seed + 10**6,
            valid_samples,
        )
        return Datasets(train, valid)
    cache_dir = prepare_cache_dir(
        cfg.data.cache_dir, output_dir
    )  # checked before Megatron reads it
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has checked the cache before rank 0 writes to it
    train, valid, _ = _build_gpt_datasets(cfg, [train_samples, valid_samples], cache_dir)
    if train is None or valid is None:
        raise ConfigError("data", "dataset builder returned no train or valid dataset")
    return Datasets(train, valid)


def collate_samples(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack dataset samples into a batch: tokens, labels, loss_mask, position_ids ``[b, s]``."""
    tokens = torch.stack([torch.as_tensor(s["tokens"], dtype=torch.long) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"], dtype=torch.long) for s in samples])
    if "loss_mask" in samples[0]:
        loss_mask = torch.stack([torch.as_tensor(s["loss_mask"]).float() for s in samples])
    else:
        loss_mask = torch.ones_like(tokens, dtype=torch.float)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
    }


def micro_batches(
    dataset: torch.utils.data.Dataset,
    start_sample: int,
    num_microbatches: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this rank's micro-batches of one global batch starting at ``start_sample``."""
    stride = micro_batch_size * dp_size
    for m in range(num_microbatches):
        first = start_sample + m * stride + dp_rank * micro_batch_size
        batch = collate_samples(
            [dataset[(first + i) % len(dataset)] for i in range(micro_batch_size)]
        )
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def held_out_micro_batches(
    dataset: torch.utils.data.Dataset,
    num_sequences: int,
    num_microbatches: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor | int]]:
    """This rank's micro-batches over exactly the first ``num_sequences`` samples of ``dataset``.

    Samples are dealt as in :func:`micro_batches`; slots past ``num_sequences`` repeat sample 0
    as padding, and each batch carries ``valid_rows``: how many of its leading rows are real.
    Every layout (any micro-batch size, data-parallel size) then reads the same sequences.
    """
    stride = micro_batch_size * dp_size
    for m in range(num_microbatches):
        first = m * stride + dp_rank * micro_batch_size
        valid = max(0, min(micro_batch_size, num_sequences - first))
        indices = [first + i if i < valid else 0 for i in range(micro_batch_size)]
        batch = collate_samples([dataset[i % len(dataset)] for i in indices])
        out: dict[str, torch.Tensor | int] = {
            k: v.to(device, non_blocking=True) for k, v in batch.items()
        }
        out["valid_rows"] = valid
        yield out
