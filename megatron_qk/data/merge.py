"""``megatron-qk merge-datasets``: join the outputs of ``preprocess --shard I/N`` into one dataset.

Each input prefix is one shard's ``--output-prefix``. Its summary (written when the shard
finished) names the shard, the job it belongs to (a hash of the whole job's inputs and options)
and the tokenizer, so a merge refuses, naming the prefix: an unfinished or missing shard, a shard
given twice, a shard of another job (other inputs, options, tokenizer, vocabulary or dtype). The
train and valid datasets are then written through megatron-core's ``IndexedDatasetBuilder``
(``add_index`` per shard, in shard order), which copies each ``.bin`` with a fixed-size buffer;
the index it builds holds every document's length in memory (about 40 bytes per document).
Outputs appear under their final names only when complete (written aside, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from megatron_qk.data.readers import PreprocessError
from megatron_qk.data.workdir import OutputPaths
from megatron_qk.rundir.atomic import write_json_atomic

SPLITS = ("train", "valid")
SUMMED = ("documents", "tokens", "skipped_total", "blank_lines", "split_by_text_fallbacks")
_COPY_BYTES = 1 << 22
_CHUNK_DOCS = 1 << 20


def read_shard(prefix: str) -> dict[str, Any]:
    """The summary of a finished shard.

    Raises:
        PreprocessError: naming the prefix, for an unfinished, missing or unsharded output.
    """
    paths = OutputPaths(prefix)
    if paths.work_dir.exists():
        raise PreprocessError(
            f"shard {prefix} is unfinished ({paths.work_dir} exists): rerun its preprocess "
            "command to complete it"
        )
    try:
        summary = json.loads(paths.summary.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PreprocessError(f"shard {prefix}: no readable {paths.summary} ({e})") from e
    if not summary.get("shard"):
        raise PreprocessError(f"{prefix} was not made with preprocess --shard I/N")
    for split in SPLITS:
        if summary.get(split):
            for ext in ("bin", "idx"):
                if not os.path.exists(f"{paths.split_prefix(split)}.{ext}"):
                    raise PreprocessError(
                        f"shard {prefix}: {paths.split_prefix(split)}.{ext} is missing"
                    )
    return summary


def check_shards(prefixes: list[str], summaries: list[dict[str, Any]]) -> list[int]:
    """The order that puts the shards in shard order; refuses an incomplete or mixed set.

    Raises:
        PreprocessError: naming the offending prefix.
    """
    first, first_prefix = summaries[0], prefixes[0]
    by_index: dict[int, str] = {}
    for prefix, summary in zip(prefixes, summaries):
        shard = summary["shard"]
        for key in ("sha256", "eod_id", "vocab_size", "dtype"):
            if summary["tokenizer"][key] != first["tokenizer"][key]:
                raise PreprocessError(
                    f"shard {prefix} has tokenizer {key} {summary['tokenizer'][key]!r}, "
                    f"shard {first_prefix} has {first['tokenizer'][key]!r}"
                )
        if shard["job"] != first["shard"]["job"] or shard["count"] != first["shard"]["count"]:
            raise PreprocessError(
                f"shard {prefix} belongs to another preprocess job than {first_prefix} "
                "(other inputs, options or shard count)"
            )
        if shard["index"] in by_index:
            raise PreprocessError(
                f"shard {shard['index']}/{shard['count']} is given twice: "
                f"{by_index[shard['index']]} and {prefix}"
            )
        by_index[shard["index"]] = prefix
    count = first["shard"]["count"]
    missing = [f"{i}/{count}" for i in range(count) if i not in by_index]
    if missing:
        raise PreprocessError(f"shard(s) {', '.join(missing)} missing (got {len(prefixes)})")
    return sorted(range(len(prefixes)), key=lambda k: summaries[k]["shard"]["index"])


def _merge_split(prefixes: list[str], split: str, out: str, dtype: str) -> int:
    # megatron.core is imported here only: the data layer stays importable without torch.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(out + ".bin", dtype=getattr(np, dtype))
    for prefix in prefixes:
        builder.add_index(OutputPaths(prefix).split_prefix(split))
    builder.finalize(out + ".idx")
    return len(builder.sequence_lengths)


def _same_stream(merged: str, parts: list[str]) -> bool:
    """Whether file ``merged`` is the concatenation of ``parts`` (compared in fixed-size blocks)."""
    with open(merged, "rb") as m:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(_COPY_BYTES):
                    if m.read(len(block)) != block:
                        return False
        return m.read(1) == b""


def verify_split(prefixes: list[str], split: str, out: str) -> None:
    """Re-read the merged index and data against the shards.

    Raises:
        PreprocessError: at the first difference.
    """
    from megatron.core.datasets.indexed_dataset import _IndexReader

    # Keep each reader alive while its arrays are used: they are views of the reader's mmap,
    # which its __del__ closes.
    merged = _IndexReader(out + ".idx", multimodal=False)
    total = len(merged.sequence_lengths)
    offset = 0
    for prefix in prefixes:
        part = OutputPaths(prefix).split_prefix(split)
        reader = _IndexReader(part + ".idx", multimodal=False)
        n = len(reader.sequence_lengths)
        for start in range(0, n, _CHUNK_DOCS):  # bounded memory for any number of documents
            stop = min(start + _CHUNK_DOCS, n)
            mine = merged.sequence_lengths[offset + start : offset + stop]
            if not np.array_equal(mine, reader.sequence_lengths[start:stop]):
                raise PreprocessError(f"--verify: {out}.idx differs from {part}.idx")
        offset += n
        del reader
    del merged
    if offset != total:
        raise PreprocessError(f"--verify: {out}.idx has {total} documents, the shards {offset}")
    bins = [OutputPaths(p).split_prefix(split) + ".bin" for p in prefixes]
    if not _same_stream(out + ".bin", bins):
        raise PreprocessError(f"--verify: {out}.bin is not the shards' data in shard order")


def merge_datasets(
    prefixes: list[str], output_prefix: str, verify: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Merge the shards at ``prefixes`` into ``output_prefix``'s train/valid datasets and summary.

    Returns:
        The merged summary (also written to ``<output_prefix>_summary.json``).

    Raises:
        PreprocessError: for a refused shard set or an existing output without ``overwrite``.
    """
    t_import = time.perf_counter()
    # Importing megatron.core (torch) takes seconds: timed apart from the merge itself.
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    import_seconds = time.perf_counter() - t_import
    t0 = time.perf_counter()
    summaries = [read_shard(p) for p in prefixes]
    order = check_shards(prefixes, summaries)
    prefixes = [prefixes[k] for k in order]
    summaries = [summaries[k] for k in order]
    paths = OutputPaths(output_prefix)
    if paths.summary.exists() and not overwrite:
        raise PreprocessError(f"{paths.summary} exists; pass --overwrite to replace it")
    aside = Path(f"{output_prefix}_merge.partial")
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir(parents=True)
    dtype = summaries[0]["tokenizer"]["dtype"]
    merged: dict[str, Any] = {k: sum(s[k] for s in summaries) for k in SUMMED}
    skipped = {k: sum(s["skipped"].get(k, 0) for s in summaries) for k in summaries[0]["skipped"]}
    merged.update(skipped=skipped, tokenizer=summaries[0]["tokenizer"])
    nbytes = 0
    for split in SPLITS:
        parts = [p for p, s in zip(prefixes, summaries) if s.get(split)]
        final = paths.split_prefix(split)
        for ext in ("bin", "idx"):
            if os.path.exists(f"{final}.{ext}"):
                os.remove(f"{final}.{ext}")
        if not parts:
            merged[split] = None
            continue
        tmp = str(aside / split)
        docs = _merge_split(parts, split, tmp, dtype)
        if verify:
            verify_split(parts, split, tmp)
        nbytes += os.path.getsize(tmp + ".bin")
        for ext in ("bin", "idx"):
            os.replace(f"{tmp}.{ext}", f"{final}.{ext}")
        tokens = sum(s[split]["tokens"] for s in summaries if s.get(split))
        info = {"documents": docs, "tokens": tokens, "prefix": final}
        merged[split] = {**info, "bin": final + ".bin", "idx": final + ".idx"}
    seconds = time.perf_counter() - t0
    merged.update(
        merged_from=[os.path.abspath(p) for p in prefixes],
        shard_job=summaries[0]["shard"]["job"],
        verified=verify,
        merge_seconds=round(seconds, 3),
        import_seconds=round(import_seconds, 3),
        merge_bytes_per_second=round(nbytes / seconds, 1) if seconds > 0 else None,
        seconds=round(seconds, 3),
        fingerprint=summaries[0]["shard"]["job"],
    )
    write_json_atomic(paths.summary, merged, mode=0o600)
    shutil.rmtree(aside, ignore_errors=True)
    return merged
