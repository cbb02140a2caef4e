"""``megatron-qk preprocess``: text (FineWeb-Edu, parquet, jsonl) -> Megatron indexed datasets.

Writes ``P_text_document.{bin,idx}`` (plus ``P_valid_text_document.{bin,idx}`` with
``--valid-fraction``) readable by megatron-core's ``IndexedDataset`` / ``GPTDataset``: GPT-2 ids
from tiktoken, one EOD (50256) after each document, uint16. ``P_summary.json`` records documents,
tokens, skipped records by reason, seconds and tokens/s. Interrupted runs resume when the same
command is run again. ``tools/preprocess_data.py`` is the same command for Megatron-LM habits.
``MQK_PREPROCESS_PAUSE_AT=EVENT[:N]`` holds a run at an event until a signal arrives (signal
tests, :mod:`megatron_qk.data.fault_injection`).

This module only builds the parser and calls :func:`megatron_qk.data.pipeline.preprocess`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from megatron_qk.data.fault_injection import pause_hook_from_env
from megatron_qk.data.pipeline import PreprocessConfig, default_workers, preprocess
from megatron_qk.data.readers import HubDataset, PreprocessError
from megatron_qk.data.tokenizer import TokenizerError
from megatron_qk.data.workdir import OutputPaths


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``preprocess`` options to ``parser``."""
    src = parser.add_argument_group("input (exactly one of --input / --hf-dataset)")
    src.add_argument(
        "--input",
        nargs="+",
        default=[],
        metavar="PATH",
        help="jsonl, jsonl.gz, json(.gz) lines or parquet files, directories (searched "
        "recursively) or globs; processed in the given order, each directory/glob sorted",
    )
    src.add_argument(
        "--hf-dataset",
        metavar="NAME",
        help="Hugging Face hub dataset streamed with datasets.load_dataset(streaming=True), "
        "e.g. HuggingFaceFW/fineweb-edu",
    )
    src.add_argument("--hf-config", metavar="C", help="hub config, e.g. sample-10BT")
    src.add_argument("--hf-split", default="train", metavar="S", help="hub split (default: train)")
    src.add_argument(
        "--hf-data-files",
        nargs="+",
        metavar="PATTERN",
        help="restrict the hub dataset to these files, e.g. sample/10BT/000_00000.parquet",
    )
    src.add_argument("--hf-revision", metavar="REV", help="hub revision (commit) to pin")

    out = parser.add_argument_group("output")
    out.add_argument(
        "--output-prefix",
        required=True,
        metavar="P",
        help="writes P_text_document.{bin,idx}, P_valid_text_document.{bin,idx}, P_summary.json",
    )
    out.add_argument(
        "--shard",
        metavar="I/N",
        help="process shard I (0-based) of N: a contiguous 1/N of the input files, resumable on "
        "its own; `megatron-qk merge-datasets` joins the N outputs into the single job's files",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an unfinished run with other options/inputs and redo a finished one",
    )

    sel = parser.add_argument_group("records")
    sel.add_argument(
        "--text-key", default="text", metavar="KEY", help="field holding the text (default: text)"
    )
    sel.add_argument(
        "--id-key", default="id", metavar="KEY", help="field holding the document id (default: id)"
    )
    sel.add_argument(
        "--min-int-score",
        type=float,
        default=None,
        metavar="S",
        help="keep only records with int_score >= this (FineWeb-Edu's 0-5 quality score)",
    )
    sel.add_argument(
        "--max-docs", type=int, default=None, metavar="N", help="stop after N documents"
    )
    sel.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="stop at the first document that brings the total (EOD included) to >= N",
    )
    sel.add_argument(
        "--strict",
        action="store_true",
        help="fail at the first bad record (file:line) instead of skipping and counting it",
    )

    split = parser.add_argument_group("validation split")
    split.add_argument(
        "--valid-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of documents for P_valid_text_document, chosen per document by a hash",
    )
    split.add_argument(
        "--split-by",
        choices=("text", "id"),
        default="text",
        help="hash the text (default: exact duplicates share a split) or the --id-key field",
    )
    split.add_argument(
        "--split-seed", type=int, default=0, metavar="N", help="salt of the split hash"
    )

    perf = parser.add_argument_group("tokenizer and performance")
    perf.add_argument(
        "--tokenizer",
        default="gpt2",
        metavar="SPEC",
        help="gpt2 (the verified vendored GPT-2 ranks); a tiktoken rank file (.tiktoken[.gz]) of "
        "r50k/p50k/cl100k/o200k_base (recognised by sha256); NAME:FILE (own ranks with encoding "
        "NAME's split pattern and special tokens); or a Hugging Face tokenizer.json "
        "(FILE.json[::EOD_TOKEN])",
    )
    perf.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tokenizer workers (default and upper bound: the CPUs this process may use, by "
        "affinity and cgroup quota; never more than the input's batches)",
    )
    perf.add_argument(
        "--backend",
        choices=("auto", "thread", "process"),
        default="auto",
        help="worker pool: processes (fastest; default 'auto' when --workers > 1) or threads "
        "(no start-up cost)",
    )
    perf.add_argument(
        "--shard-size",
        type=int,
        default=100_000,
        metavar="N",
        help="commit (resume point) every N records and at each input file's end",
    )
    perf.add_argument(
        "--no-progress", action="store_true", help="no progress bar (rank 0 shows one on stderr)"
    )


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """Build a :class:`~megatron_qk.data.pipeline.PreprocessConfig` from parsed arguments."""
    hub = None
    if args.hf_dataset:
        hub = HubDataset(
            name=args.hf_dataset,
            config=args.hf_config,
            split=args.hf_split,
            data_files=tuple(args.hf_data_files) if args.hf_data_files else None,
            revision=args.hf_revision,
        )
    return PreprocessConfig(
        output_prefix=args.output_prefix,
        inputs=list(args.input),
        hf=hub,
        tokenizer=args.tokenizer,
        text_key=args.text_key,
        id_key=args.id_key,
        min_int_score=args.min_int_score,
        valid_fraction=args.valid_fraction,
        split_by=args.split_by,
        split_seed=args.split_seed,
        max_docs=args.max_docs,
        max_tokens=args.max_tokens,
        strict=args.strict,
        workers=args.workers if args.workers is not None else default_workers(),
        backend=args.backend,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        shard=args.shard,
    )


def summary_line(summary: dict[str, Any]) -> str:
    """One-line human summary of a run."""
    parts = [f"{summary['documents']:,} documents", f"{summary['tokens']:,} tokens"]
    if summary.get("valid"):
        parts.append(f"valid {summary['valid']['documents']:,} docs")
    skipped = {k: v for k, v in summary["skipped"].items() if v}
    if skipped:
        detail = ", ".join(f"{k}={v:,}" for k, v in skipped.items())
        parts.append(f"skipped {summary['skipped_total']:,} ({detail})")
    rate = summary.get("tokens_per_second") or 0.0
    parts.append(f"{summary['seconds']:.1f} s, {rate / 1e6:.2f}M tokens/s")
    if summary.get("resumed"):
        parts.append("resumed")
    if summary.get("already_complete"):
        parts.append("already complete, nothing to do")
    train = summary.get("train")
    target = train["prefix"] if train else "(no documents)"
    return f"preprocess: {'; '.join(parts)} -> {target}"


def run(args: argparse.Namespace) -> int:
    """Run ``preprocess``; returns 0 on success, 1 on an input error or when nothing was written."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.input and args.hf_dataset:
        print("preprocess: error: give --input or --hf-dataset, not both", file=sys.stderr)
        return 2
    if not args.input and not args.hf_dataset:
        print("preprocess: error: one of --input / --hf-dataset is required", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
        config.validate()
        on_event = pause_hook_from_env()
    except ValueError as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    try:
        with logging_redirect_tqdm():
            summary = preprocess(config, on_event=on_event)
    except (PreprocessError, TokenizerError, OSError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("preprocess: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary_line(summary))
    if summary["documents"] == 0:
        source = ", ".join(config.inputs) if config.inputs else config.hf.name
        where = OutputPaths(config.output_prefix).summary
        print(
            f"preprocess: error: no documents were written from {source}: no usable record "
            f"(skipped records are counted by reason in {where})",
            file=sys.stderr,
        )
        return 1
    if config.valid_fraction > 0 and not summary.get("valid"):
        print("preprocess: warning: the validation split received no documents", file=sys.stderr)
    return 0
