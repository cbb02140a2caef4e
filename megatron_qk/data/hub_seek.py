"""Resume a hub stream at the parquet shard holding the resume row instead of re-streaming.

A streamed hub dataset made of parquet files reads its files in the order the builder resolves
them, so row ``r`` of the stream lies in the first shard whose cumulative row count exceeds
``r``. Row counts come from the parquet footers (one small read per shard before the resume
point). The stream is then reopened on the remaining files with the ``parquet`` builder and
only the rows of the resume shard before ``r`` are skipped. Streams that are not plain parquet
files (scripts, jsonl, unresolvable names) fall back to skipping from the start.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_qk.data.readers import HubDataset

logger = logging.getLogger(__name__)


def resolved_parquet_files(hub: HubDataset) -> list[str] | None:
    """The stream's files in reading order, or None when they are not all parquet files."""
    try:
        import datasets

        kwargs = {"data_files": list(hub.data_files)} if hub.data_files else {}
        if hub.revision:
            kwargs["revision"] = hub.revision
        builder = datasets.load_dataset_builder(hub.name, hub.config, **kwargs)
        files = (builder.config.data_files or {}).get(hub.split)
    except Exception as e:  # noqa: BLE001 - any failure means: no seeking, stream from the start
        logger.info("hub stream %s: cannot resolve its files (%s); skipping rows", hub.path, e)
        return None
    files = [str(f) for f in files or []]
    if not files or not all(f.split("?")[0].endswith(".parquet") for f in files):
        return None
    return files


def parquet_rows(path: str) -> int:
    """Row count from a parquet file's footer (local path or any fsspec URL, e.g. ``hf://``)."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def seek_hub_stream(hub: HubDataset, start: int) -> tuple[HubDataset | None, int]:
    """The stream to open for a resume at row ``start``, and the rows it leaves out in front.

    Returns:
        ``(hub, 0)`` when seeking is not possible or not needed; ``(parquet stream of the
        remaining shards, rows before them)``; ``(None, total rows)`` when ``start`` is past the
        last shard.
    """
    if start <= 0:
        return hub, 0
    files = resolved_parquet_files(hub)
    if files is None:
        return hub, 0
    from megatron_qk.data.readers import HubDataset

    before = 0
    for k, path in enumerate(files):
        rows = parquet_rows(path)
        if before + rows > start:
            if k == 0:
                return hub, 0
            logger.info("hub stream %s: resuming at shard %d of %d", hub.path, k + 1, len(files))
            return HubDataset(name="parquet", split="train", data_files=tuple(files[k:])), before
        before += rows
    return None, before
