"""Input sources for preprocessing: jsonl / jsonl.gz / parquet files and HF hub streams.

This is the reading side, run in the main thread: resolve and check the inputs, then cut each
source into raw batches (:class:`RawBatch`) of unparsed records (raw jsonl lines, parquet record
batches, hub dicts) of bounded size. Records are addressed by a 0-based index (the physical line
of a jsonl file, the row of a parquet file, the position in a hub stream), so a run can resume at
any record. Parsing and validation happen in the workers (:mod:`megatron_qk.data.records`).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = (
    *_JSONL_SUFFIXES,
    *(s + ".gz" for s in _JSONL_SUFFIXES),
    *_PARQUET_SUFFIXES,
)


class PreprocessError(RuntimeError):
    """A clear, user-facing error (bad input path, unreadable file, strict-mode bad record)."""


@dataclasses.dataclass(frozen=True)
class InputFile:
    """A local input file and its format (``"jsonl"``, ``"jsonl.gz"`` or ``"parquet"``)."""

    path: Path
    fmt: str

    @property
    def label(self) -> str:
        """How records of this file are located in messages (``line`` or ``row``)."""
        return "row" if self.fmt == "parquet" else "line"

    def fingerprint(self) -> dict[str, Any]:
        """Identity used in the resume key: path, size and modification time."""
        st = self.path.stat()
        return {"path": str(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclasses.dataclass(frozen=True)
class HubDataset:
    """A Hugging Face hub dataset streamed with ``datasets.load_dataset(..., streaming=True)``."""

    name: str
    config: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] | None = None
    revision: str | None = None

    @property
    def path(self) -> str:
        """Display name used in messages."""
        return f"hf://{self.name}" + (f"[{self.config}]" if self.config else "")

    label = "row"

    def fingerprint(self) -> dict[str, Any]:
        """Identity used in the resume key."""
        return {"hf": dataclasses.asdict(self)}


Source = InputFile | HubDataset


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(tuple(s + ".gz" for s in _JSONL_SUFFIXES)):
        return "jsonl.gz"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    return None


def resolve_inputs(specs: list[str]) -> list[InputFile]:
    """Expand files, directories (recursively) and globs into an ordered list of input files.

    Order is the order of ``specs``; each directory or glob expands in sorted path order. Duplicates
    (the same resolved file reached twice) are kept once, at their first position.

    Raises:
        PreprocessError: for a path that does not exist, a glob or directory with no supported
            files, or a file of unsupported format.
    """
    out: list[InputFile] = []
    seen: set[Path] = set()
    supported = ", ".join(SUPPORTED_SUFFIXES)
    for spec in specs:
        if glob.has_magic(spec):
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
            files = [m for m in matches if m.is_file() and _format_of(m)]
            if not files:
                raise PreprocessError(f"no input files ({supported}) match {spec!r}")
        elif os.path.isdir(spec):
            files = sorted(p for p in Path(spec).rglob("*") if p.is_file() and _format_of(p))
            if not files:
                raise PreprocessError(f"input directory {spec!r} holds no {supported} files")
        elif os.path.exists(spec):
            if _format_of(Path(spec)) is None:
                raise PreprocessError(f"unsupported input format: {spec!r} (expected {supported})")
            files = [Path(spec)]
        else:
            raise PreprocessError(f"input not found: {spec!r}")
        for f in files:
            resolved = f.resolve()
            if resolved not in seen:
                seen.add(resolved)
                out.append(InputFile(resolved, _format_of(resolved) or ""))
    return out


def check_parquet(source: InputFile, text_key: str, need_int_score: bool) -> int:
    """Open a parquet file's footer, check the needed columns exist, and return its row count.

    Raises:
        PreprocessError: if the file is not readable parquet or lacks a needed column.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source.path)
    except (OSError, pa.ArrowException) as e:
        raise PreprocessError(f"{source.path}: not a readable parquet file ({e})") from e
    names = pf.schema_arrow.names
    needed = [text_key] + (["int_score"] if need_int_score else [])
    for col in needed:
        if col not in names:
            raise PreprocessError(
                f"{source.path}: no column {col!r} (columns: {', '.join(names)})"
                + ("; --min-int-score needs it" if col == "int_score" else "; see --text-key")
            )
    return pf.metadata.num_rows


def check_file(source: InputFile) -> None:
    """Check a jsonl / jsonl.gz file can be opened (and gzip is really gzip).

    Raises:
        PreprocessError: naming the file.
    """
    try:
        with open(source.path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise PreprocessError(f"cannot read input {source.path}: {e}") from e
    if source.fmt == "jsonl.gz" and head and head != b"\x1f\x8b":
        raise PreprocessError(f"{source.path}: not a gzip file (bad magic bytes)")


def open_hub_dataset(hub: HubDataset):
    """``datasets.load_dataset(..., streaming=True)`` with a clear error when it cannot be reached.

    Raises:
        PreprocessError: if the dataset cannot be opened (offline, unknown name or config).
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a declared dependency
        raise PreprocessError("--hf-dataset needs the `datasets` package") from e
    kwargs: dict[str, Any] = {"split": hub.split, "streaming": True}
    if hub.data_files:
        kwargs["data_files"] = list(hub.data_files)
    if hub.revision:
        kwargs["revision"] = hub.revision
    try:
        return datasets.load_dataset(hub.name, hub.config, **kwargs)
    except Exception as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError...)
        raise PreprocessError(
            f"cannot open hub dataset {hub.name!r} (config {hub.config!r}, split {hub.split!r}): "
            f"{type(e).__name__}: {e}. Without hub access, download the parquet shards and pass "
            "them with --input."
        ) from e


@dataclasses.dataclass
class RawBatch:
    """Consecutive unparsed records of one source.

    Attributes:
        source_index: index of the source in the input list.
        kind: ``"jsonl"`` (``payload``: list of raw lines), ``"arrow"`` (a pyarrow
            ``RecordBatch`` or ``None``) or ``"dicts"`` (list of hub records).
        payload: the records.
        first_record: index of the first record of ``payload`` in its source.
        end_record: index just after the last record (the resume position within the source).
        end_of_source: whether the source has no records after this batch.
    """

    source_index: int
    kind: str
    payload: Any
    first_record: int
    end_record: int
    end_of_source: bool = False

    @property
    def num_records(self) -> int:
        """Records (and blank lines) in the batch."""
        return self.end_record - self.first_record


MAX_BATCH_RECORDS = 8192
"""The most records in one raw batch (besides its byte bound)."""

# The longest JSON line (one document) read from a jsonl / jsonl.gz input. Lines are read with
# this bound, so a hostile input (a gzip stream of zeros with no newline) fails with an error
# naming the line instead of growing one line until memory runs out.
MAX_LINE_BYTES = 64 * 1024 * 1024


def _bounded_lines(f, path: str) -> Iterator[bytes]:
    """The lines of binary file ``f``, refusing any longer than :data:`MAX_LINE_BYTES`."""
    index = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES:
            raise PreprocessError(
                f"{path}: line {index + 1} is longer than {MAX_LINE_BYTES} bytes (the limit for "
                "one JSON document); is this really JSON lines?"
            )
        yield line
        index += 1


def _jsonl_batches(
    source: InputFile, i: int, start: int, max_bytes: int, max_records: int
) -> Iterator[RawBatch]:
    opener = gzip.open if source.fmt == "jsonl.gz" else open
    lines: list[bytes] = []
    nbytes, first, index = 0, start, start - 1
    try:
        with opener(source.path, "rb") as f:
            for index, line in enumerate(_bounded_lines(f, str(source.path))):
                if index < start:
                    continue
                lines.append(line)
                nbytes += len(line)
                if nbytes >= max_bytes or len(lines) >= max_records:
                    yield RawBatch(i, "jsonl", lines, first, index + 1)
                    lines, nbytes, first = [], 0, index + 1
    except (OSError, EOFError, zlib.error) as e:
        raise PreprocessError(f"{source.path}: read error after line {index + 1}: {e}") from e
    yield RawBatch(i, "jsonl", lines, first, max(index + 1, start), end_of_source=True)


def _split_by_bytes(batch, max_bytes: int) -> Iterator:
    """Slices of an arrow record batch holding about ``max_bytes`` each (at least one row)."""
    n = batch.num_rows
    per_row = max(batch.nbytes / max(n, 1), 1.0)
    step = max(1, int(max_bytes / per_row))
    for offset in range(0, n, step):
        yield batch.slice(offset, step)


def _parquet_batches(
    source: InputFile, i: int, start: int, columns: list[str], max_bytes: int, max_records: int
) -> Iterator[RawBatch]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source.path)
        names = pf.schema_arrow.names
        columns = [c for c in dict.fromkeys(columns) if c in names]
        # Skip whole row groups before ``start`` using the footer's row counts.
        group, index = 0, 0
        while group < pf.num_row_groups and index + pf.metadata.row_group(group).num_rows <= start:
            index += pf.metadata.row_group(group).num_rows
            group += 1
        pending: RawBatch | None = None
        groups = list(range(group, pf.num_row_groups))
        read_rows = min(max_records, 1024)  # then sliced to ~max_bytes
        batches = pf.iter_batches(batch_size=read_rows, columns=columns, row_groups=groups)
        for batch in batches if groups else ():
            n = batch.num_rows
            if index + n <= start:
                index += n
                continue
            if index < start:
                batch, index = batch.slice(start - index), start
            for part in _split_by_bytes(batch, max_bytes):
                if pending is not None:
                    yield pending
                pending = RawBatch(i, "arrow", part, index, index + part.num_rows)
                index += part.num_rows
    except (OSError, pa.ArrowException) as e:
        raise PreprocessError(f"{source.path}: parquet read error: {e}") from e
    if pending is None:
        pending = RawBatch(i, "arrow", None, max(index, start), max(index, start))
    pending.end_of_source = True
    yield pending


def _hub_batches(
    hub: HubDataset, i: int, start: int, text_key: str, max_bytes: int, max_records: int
) -> Iterator[RawBatch]:
    from megatron_qk.data.hub_seek import seek_hub_stream

    # Parquet-backed streams reopen at the shard holding the resume row (see hub_seek).
    stream, before = seek_hub_stream(hub, start)
    if stream is None:
        yield RawBatch(i, "dicts", [], start, start, end_of_source=True)
        return
    ds = open_hub_dataset(stream)
    if start - before:
        ds = ds.skip(start - before)
    records: list[dict[str, Any]] = []
    nbytes, first, index = 0, start, start - 1
    for index, rec in enumerate(ds, start=start):
        records.append(rec)
        text = rec.get(text_key)
        nbytes += len(text) if isinstance(text, str) else 0
        if nbytes >= max_bytes or len(records) >= max_records:
            yield RawBatch(i, "dicts", records, first, index + 1)
            records, nbytes, first = [], 0, index + 1
    yield RawBatch(i, "dicts", records, first, max(index + 1, start), end_of_source=True)


def iter_raw_batches(
    sources: list[Source],
    start: tuple[int, int] = (0, 0),
    text_key: str = "text",
    id_key: str = "id",
    max_bytes: int = 1 << 19,
    max_records: int = MAX_BATCH_RECORDS,
) -> Iterator[RawBatch]:
    """Cut the sources, in order, into raw batches, starting at ``(source_index, record_index)``.

    A batch never spans two sources and holds at most ``max_records`` records and about
    ``max_bytes`` of data (parquet: arrow bytes of the selected columns), so memory stays bounded.
    The last batch of each source has ``end_of_source`` set (it may be empty).

    Raises:
        PreprocessError: if a source cannot be read.
    """
    for i in range(start[0], len(sources)):
        source = sources[i]
        first = start[1] if i == start[0] else 0
        if isinstance(source, HubDataset):
            yield from _hub_batches(source, i, first, text_key, max_bytes, max_records)
        elif source.fmt == "parquet":
            columns = [text_key, id_key, "int_score"]
            yield from _parquet_batches(source, i, first, columns, max_bytes, max_records)
        else:
            yield from _jsonl_batches(source, i, first, max_bytes, max_records)
