"""Checks of a Megatron indexed dataset before training on it (numpy only, no torch).

Two faults train silently or fail far from their cause: a ``.bin`` shorter (or longer) than its
``.idx`` describes (a copy cut short, a disk filled during preprocessing), and token ids at or
above the model's vocabulary (a ``.bin`` from another tokenizer, or bytes that are not tokens:
an ``IndexError`` in the embedding on CPU, a device-side assert on GPU). Both are checked here,
naming the file. The token scan reads the ``.bin`` through a memory map in fixed-size blocks
(vectorised ``min``/``max``), so it streams at disk speed with constant memory; recipes on
corpora too large to scan each launch turn it off with ``data.check_token_ids: false``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_qk.data.indexed import DTYPE_CODES, INDEX_MAGIC, INDEX_VERSION

_HEADER = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, S, D + 1
_SCAN_BLOCK = 1 << 25  # tokens per block of the id scan (64-256 MB depending on dtype)
_CODE_TO_DTYPE = {code: np.dtype(name) for name, code in DTYPE_CODES.items()}


class DataFileError(ValueError):
    """An indexed dataset file is damaged or does not match the model; names the file."""


@dataclass(frozen=True)
class IndexExtent:
    """What an ``.idx`` says about its ``.bin``."""

    dtype: np.dtype
    num_sequences: int
    bin_bytes: int  # exact size the .bin must have


def read_index_extent(idx_path: str | os.PathLike[str]) -> IndexExtent:
    """Parse an ``.idx`` header and its last pointer to get the ``.bin`` size it describes.

    Raises:
        DataFileError: naming ``idx_path``: not an ``INDEX_VERSION`` index, or truncated.
    """
    idx_path = Path(idx_path)
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER)
        if len(head) < _HEADER or not head.startswith(INDEX_MAGIC):
            raise DataFileError(f"{idx_path} is not a Megatron indexed-dataset index (bad header)")
        version, code, num_seq, num_docs1 = struct.unpack("<QBQQ", head[len(INDEX_MAGIC) :])
        if version != INDEX_VERSION or code not in _CODE_TO_DTYPE:
            raise DataFileError(f"{idx_path}: unsupported version {version} or dtype code {code}")
        need = _HEADER + 4 * num_seq + 8 * num_seq + 8 * num_docs1
        if size < need:
            raise DataFileError(
                f"{idx_path} is {size} bytes but its header describes {need}: truncated index"
            )
        dtype = _CODE_TO_DTYPE[code]
        if num_seq == 0:
            return IndexExtent(dtype, 0, 0)
        f.seek(_HEADER + 4 * (num_seq - 1))
        (last_len,) = struct.unpack("<i", f.read(4))
        f.seek(_HEADER + 4 * num_seq + 8 * (num_seq - 1))
        (last_ptr,) = struct.unpack("<q", f.read(8))
    return IndexExtent(dtype, num_seq, last_ptr + last_len * dtype.itemsize)


def check_bin_size(prefix: str) -> IndexExtent:
    """The ``.bin`` must have exactly the size its ``.idx`` describes.

    Raises:
        DataFileError: naming the ``.bin``, its size and the expected size.
    """
    extent = read_index_extent(prefix + ".idx")
    bin_path = prefix + ".bin"
    actual = os.path.getsize(bin_path)
    if actual != extent.bin_bytes:
        kind = "truncated" if actual < extent.bin_bytes else "longer than its index"
        raise DataFileError(
            f"{bin_path} is {actual} bytes but {prefix}.idx describes {extent.bin_bytes} "
            f"({kind}): re-copy or re-preprocess this dataset"
        )
    return extent


def check_token_ids(prefix: str, vocab_size: int, extent: IndexExtent | None = None) -> None:
    """Every token id in ``prefix.bin`` must be in ``[0, vocab_size)``.

    Raises:
        DataFileError: naming the ``.bin``, the first bad id and its token offset.
    """
    extent = extent or check_bin_size(prefix)
    bin_path = prefix + ".bin"
    count = extent.bin_bytes // extent.dtype.itemsize
    if count == 0:
        return
    tokens = np.memmap(bin_path, dtype=extent.dtype, mode="r", shape=(count,))
    for start in range(0, count, _SCAN_BLOCK):
        block = tokens[start : start + _SCAN_BLOCK]
        if block.min() < 0 or block.max() >= vocab_size:
            bad = np.flatnonzero((block < 0) | (block >= vocab_size))[0]
            raise DataFileError(
                f"{bin_path}: token {int(block[bad])} at token offset {start + int(bad)} is "
                f"outside the model vocabulary [0, {vocab_size}) (model.vocab_size): the data "
                "was made with another tokenizer or is damaged (skip this scan with "
                "data.check_token_ids: false only for data you trust)"
            )


def check_indexed_dataset(prefix: str, vocab_size: int, scan_tokens: bool = True) -> None:
    """Both files exist, the ``.bin`` size matches the ``.idx``, and (optionally) the ids fit.

    Raises:
        DataFileError: naming the file at fault.
    """
    for suffix in (".idx", ".bin"):
        if not os.path.isfile(prefix + suffix):
            raise DataFileError(f"dataset file {prefix + suffix} does not exist")
    extent = check_bin_size(prefix)
    if scan_tokens:
        check_token_ids(prefix, vocab_size, extent)
