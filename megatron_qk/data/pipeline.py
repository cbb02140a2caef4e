"""The preprocessing pipeline: raw batches -> workers -> ordered writer -> indexed datasets.

:func:`preprocess` is the library entry point behind ``megatron-qk preprocess``. Data flow:

1. :mod:`~megatron_qk.data.readers` cut each source, in input order, into raw batches of about
   0.5 MB (main thread: file reading only).
2. :mod:`~megatron_qk.data.encode` runs the batches on ``workers`` threads (or processes): parse
   and classify the records, assign the split (:mod:`~megatron_qk.data.records`), tokenize.
   Results come back in input order, so the output is the same for every worker count.
3. :mod:`~megatron_qk.data.output` appends them, applies the limits and strict mode in input
   order, and commits every ``shard_size`` records and at each source's end (fsync + atomic
   manifest, see :mod:`~megatron_qk.data.workdir`), which is what makes runs resumable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_qk.data.encode import BatchProcessor
from megatron_qk.data.options import PreprocessConfig, default_workers
from megatron_qk.data.output import SPLITS, OutputRun, RunState
from megatron_qk.data.readers import (
    PreprocessError,
    Source,
    check_file,
    check_parquet,
    iter_raw_batches,
    resolve_inputs,
)
from megatron_qk.data.records import RecordConfig
from megatron_qk.data.sharding import parse_shard, shard_files, shard_hub
from megatron_qk.data.tokenizer import TokenizerInfo, load_tokenizer
from megatron_qk.data.workdir import OutputPaths, WorkDir, final_moves, publish
from megatron_qk.data.workers import plan_workers

__all__ = ["PreprocessConfig", "default_workers", "preprocess", "run_identity"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _resolve_sources(config: PreprocessConfig) -> tuple[list[Source], list[Source], int | None]:
    """Resolve and check the inputs: the whole job's sources, this run's (its ``--shard``) and
    this run's total record count when known."""
    shard = parse_shard(config.shard) if config.shard else None
    if config.hf is not None:
        mine = [shard_hub(config.hf, shard)] if shard else [config.hf]
        return [config.hf], mine, None
    files = resolve_inputs(config.inputs)
    selected = shard_files(files, shard) if shard else files
    total: int | None = 0
    for f in selected:
        if f.fmt == "parquet":
            rows = check_parquet(f, config.text_key, config.min_int_score is not None)
            total = None if total is None else total + rows
        else:
            check_file(f)
            total = None
    return list(files), list(selected), total


def run_identity(
    config: PreprocessConfig, sources: list[Source], tok: TokenizerInfo
) -> dict[str, Any]:
    """Everything the output bytes depend on; its hash keys resumption and completion."""
    return {
        "format": FORMAT_VERSION,
        "sources": [s.fingerprint() for s in sources],
        "text_key": config.text_key,
        "id_key": config.id_key,
        "min_int_score": config.min_int_score,
        "valid_fraction": config.valid_fraction,
        "split_by": config.split_by,
        "split_seed": config.split_seed,
        "max_docs": config.max_docs,
        "max_tokens": config.max_tokens,
        "tokenizer_sha256": tok.ranks_sha256,
        "eod_id": tok.eod_id,
        "dtype": tok.dtype_name,
    }


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _outputs_complete(paths: OutputPaths, key: str) -> dict[str, Any] | None:
    """The existing summary if a finished run with the same fingerprint is on disk."""
    try:
        summary = json.loads(paths.summary.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("fingerprint") != key:
        return None
    for split in SPLITS:
        info = summary.get(split)
        if info and not all(os.path.exists(info[k]) for k in ("bin", "idx")):
            return None
    return summary


def preprocess(
    config: PreprocessConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Tokenize the configured inputs into Megatron indexed datasets; resumable.

    Args:
        config: the options.
        on_event: called with ``("commit" | "finalizing", manifest)`` after each commit, and
            with ``("workers_started", {"workers": N, "backend": B})`` once the worker pool
            exists (tests use it to interrupt a run at a precise point, see
            :mod:`~megatron_qk.data.fault_injection`).

    Returns:
        The summary that is also written to ``<prefix>_summary.json``.

    Raises:
        PreprocessError: for bad inputs, a strict-mode bad record or a conflicting unfinished run.
        ValueError: for invalid options.
    """
    t0 = time.perf_counter()
    config.validate()
    job_sources, sources, total_records = _resolve_sources(config)
    tok = load_tokenizer(config.tokenizer)
    identity = run_identity(config, job_sources, tok)
    if config.shard:
        # The whole job's identity names the job that merge-datasets reassembles.
        shard = parse_shard(config.shard)
        job = _fingerprint(identity)
        identity["sources"] = [s.fingerprint() for s in sources]
        identity["shard"] = {"index": shard.index, "count": shard.count, "job": job}
    key = _fingerprint(identity)
    paths = OutputPaths(config.output_prefix)
    Path(config.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    work = WorkDir(paths.work_dir)
    if not config.overwrite and not work.path.exists():
        done = _outputs_complete(paths, key)
        if done is not None:
            logger.info("outputs for this command are already complete: %s", paths.summary)
            return {**done, "already_complete": True}
    work.acquire()
    try:
        manifest = work.read_manifest()
        if manifest is not None and manifest["fingerprint"] != key and not config.overwrite:
            old = manifest.get("identity", {})
            changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise PreprocessError(
                f"{work.path} holds an unfinished run with different inputs or options "
                f"(changed: {', '.join(changed)}); rerun that exact command to resume it, "
                "or pass --overwrite to discard it"
            )
        if manifest is not None and config.overwrite:
            manifest = None
        if manifest is not None and manifest["phase"] == "finalizing":
            publish(*final_moves(paths, work, manifest["state"]["documents"]))
            summary = json.loads(paths.summary.read_text(encoding="utf-8"))
            work.remove()
            return summary
        if manifest is None:
            work.clear()
        state = RunState(**manifest["state"]) if manifest is not None else RunState()
        run = OutputRun(config, sources, tok, work, state, identity, key, on_event, t0)
        resumed_from = None
        if manifest is not None:
            resumed_from = {"documents": state.total_documents, "tokens": state.total_tokens}
            logger.info(
                "resuming %s: %d documents, %d tokens already committed",
                work.path,
                state.total_documents,
                state.total_tokens,
            )
        run.open_writers(resume=manifest is not None)
        if manifest is None:
            run.commit()
        if not state.limit_reached:
            _tokenize(run, sources, total_records)
        summary = run.finalize(resumed_from)
        work.remove()
        return summary
    finally:
        work.release()


def _tokenize(run: OutputRun, sources: list[Source], total_records: int | None) -> None:
    """The main loop: raw batches in, ordered processed batches out, commits along the way."""
    cfg, state, tok = run.config, run.state, run.tok
    record_config = RecordConfig(
        text_key=cfg.text_key,
        id_key=cfg.id_key,
        min_int_score=cfg.min_int_score,
        valid_fraction=cfg.valid_fraction,
        split_by=cfg.split_by,
        split_seed=cfg.split_seed,
        strict=cfg.strict,
    )
    batches = iter_raw_batches(
        sources,
        start=(state.position[0], state.position[1]),
        text_key=cfg.text_key,
        id_key=cfg.id_key,
        max_bytes=cfg.chunk_bytes,
    )
    run.workers, lowered = plan_workers(cfg.workers, sources, cfg.chunk_bytes)
    if lowered:
        logger.info(lowered)
    processor = BatchProcessor(
        record_config,
        tok.encoding,
        cfg.tokenizer,
        tok.eod_id,
        tok.dtype_name,
        run.workers,
        cfg.backend,
    )
    if run.on_event:
        run.on_event("workers_started", {"workers": run.workers, "backend": processor.backend})
    bar = _progress_bar(cfg, total_records, state.records)
    since_commit = 0
    clean_exit = False
    strict_stop = False
    results = processor.map_ordered(batches)
    try:
        for batch, enc in results:
            stop = run.write(batch, enc)
            since_commit += batch.num_records
            if bar is not None:
                bar.update(batch.num_records)
                elapsed = max(time.perf_counter() - run.t0, 1e-9)
                rate = (state.total_tokens - run.start_tokens) / elapsed
                bar.set_postfix_str(
                    f"docs={state.total_documents:,} tokens={state.total_tokens:,} "
                    f"{rate / 1e6:.2f}M tok/s",
                    refresh=False,
                )
            if stop:
                break
            if batch.end_of_source or since_commit >= cfg.shard_size:
                run.commit()
                since_commit = 0
        clean_exit = True
    except PreprocessError:
        strict_stop = cfg.strict  # a strict-mode bad record: rerunning stops at it again
        raise
    finally:
        results.close()  # closes the reader and its open input file
        processor.close()
        if bar is not None:
            bar.close()
        if not clean_exit:
            _commit_after_error(run, strict_stop)
    run.commit()


def _commit_after_error(run: OutputRun, strict_stop: bool = False) -> None:
    """Keep the progress of an interrupted run (the state covers only fully written chunks)."""
    try:
        run.commit()
        if strict_stop:
            logger.warning(
                "stopped at a bad record in --strict mode; %s documents are committed in %s. "
                "Running the same command again stops at the same record: fix or remove it "
                "(file:line above), or rerun without --strict to skip and count bad records",
                f"{run.state.total_documents:,}",
                run.work.path,
            )
            return
        logger.warning(
            "stopped; %s documents (%s tokens) are committed in %s and running the same command "
            "again continues from there",
            f"{run.state.total_documents:,}",
            f"{run.state.total_tokens:,}",
            run.work.path,
        )
    except Exception as e:  # the original error matters more
        logger.warning("could not commit progress after the error: %s", e)


def _progress_bar(cfg: PreprocessConfig, total: int | None, initial: int):
    """A tqdm bar on stderr for rank 0 only (``RANK``/``SLURM_PROCID`` unset or 0)."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    if not cfg.progress or rank != 0:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit=" rec",
        unit_scale=True,
        desc="preprocess",
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
        dynamic_ncols=True,
    )
