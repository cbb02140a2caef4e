"""Record parsing, validation and split assignment: the part of the pipeline run by the workers.

A :class:`~megatron_qk.data.readers.RawBatch` (raw jsonl lines, a parquet record batch or hub
dicts) is parsed into ``(index, text, doc_id, int_score)`` records, each record is classified
(kept, or skipped with a reason from :data:`SKIP_REASONS`), and each kept document is assigned to
the train or validation split by a salted hash of its text (or id). Doing this in the workers
rather than in the reading thread keeps JSON parsing off the critical path and lets it scale with
the workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any

SKIP_REASONS: dict[str, str] = {
    "invalid_utf8": "bytes are not valid UTF-8 (or the text holds lone surrogates)",
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the JSON value is not an object",
    "missing_text": "the record has no text field",
    "non_string_text": "the text field is null or not a string",
    "empty_text": "the text is empty or whitespace only",
    "missing_int_score": "--min-int-score is set and the record has no numeric int_score",
    "below_min_int_score": "int_score is below --min-int-score",
}

BLANK_LINE = "blank_line"
"""Pseudo-reason for blank jsonl lines: counted separately (``blank_lines``), never an error."""

_HASH_PERSON = b"mqk-valid-split"


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> str:  # pickles as the module-level singleton (process backend)
        return self.name


MISSING: Any = _Marker("MISSING")
"""Marker for a record field that is absent."""
BLANK: Any = _Marker("BLANK")
"""Marker yielded in place of the text for a blank jsonl line (not a record)."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A record that could not be parsed: ``reason`` is a :data:`SKIP_REASONS` key."""

    reason: str
    detail: str


@dataclasses.dataclass(frozen=True)
class RecordConfig:
    """Record selection options (see ``megatron-qk preprocess --help``)."""

    text_key: str = "text"
    id_key: str = "id"
    min_int_score: float | None = None
    valid_fraction: float = 0.0
    split_by: str = "text"
    split_seed: int = 0
    strict: bool = False


@dataclasses.dataclass
class SkipEvent:
    """A skipped record (or blank line) and where it is.

    Attributes:
        docs_before: kept documents of the same batch that precede it.
        reason: a :data:`SKIP_REASONS` key or :data:`BLANK_LINE`.
        index: 0-based record index in its source.
        detail: human-readable detail ("" if none).
    """

    docs_before: int
    reason: str
    index: int
    detail: str = ""


@dataclasses.dataclass
class Selection:
    """The kept documents of a batch, in order, plus what was skipped among them.

    Attributes:
        texts: kept documents.
        valid: per kept document, 1 for the validation split (``None`` without a split).
        skips: skipped records and blank lines, in order.
        id_fallbacks: documents split by text because ``--split-by id`` found no usable id.
        error: in strict mode, the first bad record (the batch stops before it).
    """

    texts: list[str] = dataclasses.field(default_factory=list)
    valid: bytearray | None = None
    skips: list[SkipEvent] = dataclasses.field(default_factory=list)
    id_fallbacks: int = 0
    error: SkipEvent | None = None


def valid_split_threshold(fraction: float) -> int:
    """64-bit threshold below which a document's hash puts it in the validation split."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"valid fraction must be in [0, 1), got {fraction}")
    return int(fraction * 2**64)


def split_hash(key: bytes, seed: int = 0) -> int:
    """Deterministic 64-bit hash of a document key (blake2b, salted by ``seed``)."""
    digest = hashlib.blake2b(
        key, digest_size=8, person=_HASH_PERSON, salt=seed.to_bytes(8, "little")
    ).digest()
    return int.from_bytes(digest, "little")


def classify(text: Any, int_score: Any, min_int_score: float | None) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` if a parsed record must be skipped, else ``None``."""
    if isinstance(text, BadRecord):
        return text.reason, text.detail
    if text is MISSING:
        return "missing_text", ""
    if not isinstance(text, str):
        return "non_string_text", f"got {type(text).__name__}"
    if not text or text.isspace():
        return "empty_text", ""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return "invalid_utf8", str(e)
    if min_int_score is not None:
        if isinstance(int_score, bool) or not isinstance(int_score, int | float):
            return "missing_int_score", f"got {int_score!r}"
        if int_score < min_int_score:
            return "below_min_int_score", f"int_score {int_score} < {min_int_score}"
    return None


def _parse_lines(lines: list[bytes], first: int, text_key: str, id_key: str) -> Iterator[tuple]:
    for offset, line in enumerate(lines):
        index = first + offset
        if not line.strip():
            yield index, BLANK, None, None
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield index, BadRecord("invalid_utf8", str(e)), None, None
            continue
        except json.JSONDecodeError as e:
            yield index, BadRecord("malformed_json", str(e)), None, None
            continue
        if not isinstance(obj, dict):
            yield index, BadRecord("not_an_object", f"got {type(obj).__name__}"), None, None
            continue
        yield index, obj.get(text_key, MISSING), obj.get(id_key), obj.get("int_score")


def _decode_column(column) -> list[Any]:
    """A parquet column as Python values; invalid UTF-8 becomes a :class:`BadRecord`."""
    import pyarrow as pa

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            return column.to_pylist()
        except UnicodeDecodeError:  # pyarrow does not validate UTF-8 on read
            large = pa.types.is_large_string(column.type)
            column = column.cast(pa.large_binary() if large else pa.binary())
    values = column.to_pylist()
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        out = []
        for v in values:
            try:
                out.append(v.decode("utf-8") if v is not None else None)
            except UnicodeDecodeError as e:
                out.append(BadRecord("invalid_utf8", str(e)))
        return out
    return values


def _parse_arrow(batch, first: int, text_key: str, id_key: str) -> Iterator[tuple]:
    names = batch.schema.names
    n = batch.num_rows
    texts = _decode_column(batch.column(names.index(text_key)))
    ids = _decode_column(batch.column(names.index(id_key))) if id_key in names else [None] * n
    scores = batch.column(names.index("int_score")).to_pylist() if "int_score" in names else None
    for j in range(n):
        yield first + j, texts[j], ids[j], scores[j] if scores is not None else None


def parse_batch(kind: str, payload: Any, first: int, text_key: str, id_key: str) -> Iterator:
    """Records ``(index, text, doc_id, int_score)`` of a raw batch.

    ``text`` is :data:`BLANK` for a blank jsonl line, :data:`MISSING` when the field is absent, a
    :class:`BadRecord` when the record could not be parsed, else the raw field value.
    """
    if kind == "jsonl":
        return _parse_lines(payload, first, text_key, id_key)
    if kind == "arrow":
        return _parse_arrow(payload, first, text_key, id_key) if payload is not None else iter(())
    return (
        (first + j, rec.get(text_key, MISSING), rec.get(id_key), rec.get("int_score"))
        for j, rec in enumerate(payload)
    )


def select_documents(kind: str, payload: Any, first: int, config: RecordConfig) -> Selection:
    """Parse a raw batch, classify its records and assign the kept documents to splits.

    In strict mode the batch stops at the first bad record, which is returned as ``error``.
    """
    threshold = valid_split_threshold(config.valid_fraction) if config.valid_fraction else None
    by_id = config.split_by == "id"
    out = Selection(valid=bytearray() if threshold is not None else None)
    texts, skips = out.texts, out.skips
    for index, text, doc_id, int_score in parse_batch(
        kind, payload, first, config.text_key, config.id_key
    ):
        if text is BLANK:
            skips.append(SkipEvent(len(texts), BLANK_LINE, index))
            continue
        bad = classify(text, int_score, config.min_int_score)
        if bad is not None:
            event = SkipEvent(len(texts), bad[0], index, bad[1])
            if config.strict:
                out.error = event
                return out
            skips.append(event)
            continue
        if threshold is not None:
            if by_id and isinstance(doc_id, str | int) and not isinstance(doc_id, bool):
                key = str(doc_id).encode("utf-8", "surrogatepass")
            else:
                out.id_fallbacks += by_id
                key = text.encode("utf-8")
            out.valid.append(split_hash(key, config.split_seed) < threshold)
        texts.append(text)
    return out
