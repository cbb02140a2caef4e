"""``data_order``: a fingerprint of which samples a run reads, in which order.

Paired comparisons (paper, Appendix H and J: "All paired comparisons keep data order ... fixed
within the pair") are only valid when both runs see the same training samples in the same order
and are evaluated on the same validation samples. The fingerprint hashes the identity of the
first :data:`TRAIN_SAMPLES` training samples (in order) and of the validation samples (as a set),
so ``compare`` can refuse a pair that read different data even when their recipes look alike.

A sample's identity is where its tokens come from, not the tokens themselves (cheap for 10,000
samples of a 2.5B-token corpus): for Megatron's ``GPTDataset`` the documents it spans and the
offsets into the first and last of them; for a ``BlendedDataset`` the chosen dataset and that
dataset's sample; for the synthetic stream its seed and index.
"""

from __future__ import annotations

import hashlib

TRAIN_SAMPLES = 10_000


def _ensure_loaded(dataset) -> None:
    # GPTDataset/BlendedDataset may memory-map their index arrays lazily on first access.
    if getattr(dataset, "shuffle_index", 0) is None or getattr(dataset, "dataset_index", 0) is None:
        dataset[0]


def sample_identity(dataset, index: int) -> tuple:
    """Where sample ``index`` of ``dataset`` comes from (see the module docstring)."""
    if hasattr(dataset, "dataset_index") and hasattr(dataset, "datasets"):
        _ensure_loaded(dataset)
        which = int(dataset.dataset_index[index])
        inner = int(dataset.dataset_sample_index[index])
        return ("blend", which, sample_identity(dataset.datasets[which], inner))
    if hasattr(dataset, "shuffle_index") and hasattr(dataset, "sample_index"):
        _ensure_loaded(dataset)
        j = int(dataset.shuffle_index[index])
        beg, beg_offset = (int(x) for x in dataset.sample_index[j])
        end, end_offset = (int(x) for x in dataset.sample_index[j + 1])
        docs = tuple(int(d) for d in dataset.document_index[beg : end + 1])
        return ("gpt", docs, beg_offset, end_offset)
    if hasattr(dataset, "pattern") and hasattr(dataset, "seed"):
        return ("synthetic", dataset.pattern, dataset.vocab, int(dataset.seed), int(index))
    # Unknown dataset kind: fall back to the tokens themselves.
    tokens = dataset[index]["tokens"]
    return ("tokens", hashlib.sha256(bytes(memoryview(tokens.numpy()))).hexdigest())


def data_order_hash(train, valid, valid_samples: int, train_samples: int = TRAIN_SAMPLES) -> str:
    """sha256 (first 16 hex digits) of the training order and the validation sample set.

    Args:
        train: the training dataset, indexed by global sample number (wrapping like the loop).
        valid: the validation dataset.
        valid_samples: how many validation samples evaluations read (``eval_iters x global
            batch``; the diagnostic sequences are the first of them).
        train_samples: how many leading training samples to fingerprint.
    """
    digest = hashlib.sha256()
    for i in range(min(train_samples, len(train))):
        digest.update(repr(sample_identity(train, i)).encode())
    digest.update(b"|valid|")
    n = len(valid)
    for key in sorted(repr(sample_identity(valid, i % n)) for i in range(valid_samples)):
        digest.update(key.encode())
    return digest.hexdigest()[:16]
