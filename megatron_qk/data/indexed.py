"""Megatron indexed-dataset (``.bin`` / ``.idx``) writer without megatron or torch.

Produces files byte-identical to megatron-core 0.16.1's ``IndexedDatasetBuilder`` for documents of
one sequence each (GPT pretraining data). Layout of the ``.idx`` (little endian)::

    b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q S sequences | <Q D+1
    int32[S] sequence lengths | int64[S] byte pointers into .bin | int64[D+1] document indices

The ``.bin`` is the token arrays concatenated with no header. :class:`TokenStreamWriter` appends
tokens to the ``.bin`` and lengths to a side file, so memory stays constant however many documents
are written; :func:`write_index` then streams the ``.idx`` from that side file. Writers can be
truncated back to a committed size, which is how interrupted runs resume.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from megatron_qk.data.safe_files import open_nofollow

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[str, int] = {
    "uint8": 1,
    "int8": 2,
    "int16": 3,
    "int32": 4,
    "int64": 5,
    "float64": 6,
    "float32": 7,
    "uint16": 8,
}
_CHUNK = 1 << 20  # sequences per streamed block of the .idx


def index_header(dtype: np.dtype | str, num_sequences: int, num_documents: int) -> bytes:
    """The fixed 34-byte ``.idx`` header.

    Args:
        dtype: token dtype of the ``.bin``.
        num_sequences: number of sequences S.
        num_documents: number of documents D (the header stores D + 1).
    """
    code = DTYPE_CODES[np.dtype(dtype).name]
    return (
        INDEX_MAGIC
        + struct.pack("<Q", INDEX_VERSION)
        + struct.pack("<B", code)
        + struct.pack("<Q", num_sequences)
        + struct.pack("<Q", num_documents + 1)
    )


def write_index(
    idx_path: str | os.PathLike[str],
    dtype: np.dtype | str,
    length_chunks: Callable[[], Iterable[np.ndarray]],
    num_sequences: int,
) -> None:
    """Write an ``.idx`` for one-sequence documents, streaming the lengths twice.

    Args:
        idx_path: output path (written in place; callers rename atomically).
        dtype: token dtype of the matching ``.bin``.
        length_chunks: returns a fresh iterable of int32 length arrays whose concatenation is the
            ``num_sequences`` sequence lengths (called twice: lengths, then pointers).
        num_sequences: total number of sequences (= documents).

    Raises:
        ValueError: if the chunks do not add up to ``num_sequences``.
    """
    itemsize = np.dtype(dtype).itemsize
    with open_nofollow(idx_path, "wb") as f:
        f.write(index_header(dtype, num_sequences, num_sequences))
        seen = 0
        for lengths in length_chunks():
            f.write(np.asarray(lengths, dtype=np.int32).tobytes(order="C"))
            seen += len(lengths)
        if seen != num_sequences:
            raise ValueError(f"length chunks hold {seen} sequences, expected {num_sequences}")
        offset = 0
        for lengths in length_chunks():
            ends = np.cumsum(np.asarray(lengths, dtype=np.int64) * itemsize) + offset
            starts = np.empty_like(ends)
            starts[:1] = offset
            starts[1:] = ends[:-1]
            f.write(starts.tobytes(order="C"))
            if len(ends):
                offset = int(ends[-1])
        for start in range(0, num_sequences + 1, _CHUNK):
            stop = min(start + _CHUNK, num_sequences + 1)
            f.write(np.arange(start, stop, dtype=np.int64).tobytes(order="C"))


def read_length_chunks(lens_path: str | os.PathLike[str], count: int) -> Iterator[np.ndarray]:
    """Yield the first ``count`` int32 values of a raw lengths file in blocks."""
    with open_nofollow(lens_path, "rb") as f:
        remaining = count
        while remaining:
            n = min(remaining, _CHUNK)
            block = np.frombuffer(f.read(4 * n), dtype=np.int32)
            if len(block) != n:
                got = count - remaining + len(block)
                raise ValueError(f"{lens_path}: truncated ({got} < {count} lengths)")
            yield block
            remaining -= n


def write_indexed_dataset(
    prefix: str | os.PathLike[str], documents: Iterable[np.ndarray], dtype: np.dtype | str
) -> int:
    """Write ``prefix.bin`` / ``prefix.idx`` holding ``documents`` (one sequence each).

    Convenience for small data and tests; the preprocess pipeline uses :class:`TokenStreamWriter`.

    Returns:
        Number of documents written.
    """
    prefix = str(prefix)
    writer = TokenStreamWriter(prefix + ".bin", prefix + ".lens", dtype)
    for doc in documents:
        arr = np.asarray(doc, dtype=dtype)
        writer.append(arr, np.array([len(arr)], dtype=np.int32))
    writer.finalize(prefix + ".idx")
    os.remove(prefix + ".lens")
    return writer.num_sequences


class TokenStreamWriter:
    """Append-only writer of a ``.bin`` plus a raw int32 lengths side file.

    Args:
        bin_path: the ``.bin`` being written.
        lens_path: the lengths side file (int32 per sequence).
        dtype: token dtype.
        resume_bytes: if given, reopen existing files and truncate them to this committed ``.bin``
            size (and ``resume_sequences`` lengths), discarding anything written after the commit.
        resume_sequences: committed number of sequences (with ``resume_bytes``).
    """

    def __init__(
        self,
        bin_path: str | os.PathLike[str],
        lens_path: str | os.PathLike[str],
        dtype: np.dtype | str,
        resume_bytes: int | None = None,
        resume_sequences: int = 0,
    ) -> None:
        self.bin_path = Path(bin_path)
        self.lens_path = Path(lens_path)
        self.dtype = np.dtype(dtype)
        if resume_bytes is None:
            self._bin = open_nofollow(self.bin_path, "wb")
            self._lens = open_nofollow(self.lens_path, "wb")
            self.num_bytes = 0
            self.num_sequences = 0
        else:
            committed = ((self.bin_path, resume_bytes), (self.lens_path, 4 * resume_sequences))
            for path, size in committed:
                if not path.exists() or path.stat().st_size < size:
                    raise ValueError(f"cannot resume: {path} is missing or under {size} bytes")
            self._bin = open_nofollow(self.bin_path, "r+b")
            self._lens = open_nofollow(self.lens_path, "r+b")
            self._bin.truncate(resume_bytes)
            self._lens.truncate(4 * resume_sequences)
            self._bin.seek(resume_bytes)
            self._lens.seek(4 * resume_sequences)
            self.num_bytes = resume_bytes
            self.num_sequences = resume_sequences

    @property
    def num_tokens(self) -> int:
        """Tokens written so far."""
        return self.num_bytes // self.dtype.itemsize

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: their concatenated ``tokens`` and int32 per-document ``lengths``."""
        if tokens.dtype != self.dtype:
            raise TypeError(f"tokens have dtype {tokens.dtype}, writer expects {self.dtype}")
        data = tokens.tobytes(order="C")
        self._bin.write(data)
        self._lens.write(np.asarray(lengths, dtype=np.int32).tobytes(order="C"))
        self.num_bytes += len(data)
        self.num_sequences += len(lengths)

    def commit(self) -> tuple[int, int]:
        """Flush and fsync both files; returns ``(num_bytes, num_sequences)`` to record."""
        for f in (self._bin, self._lens):
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
        return self.num_bytes, self.num_sequences

    def close(self) -> None:
        """Close the files (idempotent)."""
        self._bin.close()
        self._lens.close()

    def finalize(self, idx_path: str | os.PathLike[str]) -> None:
        """Commit, close and write the ``.idx`` for everything appended."""
        self.commit()
        self.close()
        n = self.num_sequences
        write_index(idx_path, self.dtype, lambda: read_length_chunks(self.lens_path, n), n)
