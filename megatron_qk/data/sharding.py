"""``preprocess --shard I/N``: one job's input cut into N contiguous pieces, by file.

Shard ``I`` of ``N`` takes the input files ``[I*F//N, (I+1)*F//N)`` of the ``F`` files of the
whole job, in input order (local files after directory/glob expansion, or the parquet files a hub
dataset resolves to). Documents are assigned to the validation split by their own hash, so each
document lands in the same split as in the single job, and the shards' outputs concatenated in
shard order (``megatron-qk merge-datasets``) are the single job's files byte for byte. A file is
the unit because FineWeb-Edu comes as thousands of parquet files: every shard opens only its own.
"""

from __future__ import annotations

import dataclasses

from megatron_qk.data.readers import HubDataset, InputFile, PreprocessError


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` -> :class:`Shard`.

    Raises:
        ValueError: naming ``--shard`` when the value is not ``I/N`` with ``0 <= I < N``.
    """
    index, sep, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None or shard.count < 1 or not 0 <= shard.index < shard.count:
        raise ValueError(f"--shard must be I/N with 0 <= I < N (e.g. 0/16), got {text!r}")
    return shard


def _piece(items: list, shard: Shard, what: str) -> list:
    if shard.count > len(items):
        raise PreprocessError(
            f"--shard {shard}: the input has {len(items)} {what}, so at most {len(items)} "
            "shards (a shard is a run of whole files)"
        )
    n = len(items)
    return items[shard.index * n // shard.count : (shard.index + 1) * n // shard.count]


def shard_files(files: list[InputFile], shard: Shard) -> list[InputFile]:
    """The local input files of ``shard``."""
    return _piece(files, shard, "files")


def shard_hub(hub: HubDataset, shard: Shard) -> HubDataset:
    """A parquet stream over the hub dataset files of ``shard``.

    Raises:
        PreprocessError: when the dataset's files cannot be listed or are not parquet files.
    """
    from megatron_qk.data.hub_seek import resolved_parquet_files

    files = resolved_parquet_files(hub)
    if files is None:
        raise PreprocessError(
            f"--shard {shard}: cannot list the parquet files of {hub.path} (split {hub.split!r}); "
            "pass them with --hf-data-files, or download them and use --input"
        )
    return HubDataset(
        name="parquet", split="train", data_files=tuple(_piece(files, shard, "files"))
    )
