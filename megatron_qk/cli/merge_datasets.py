"""``megatron-qk merge-datasets``: join ``preprocess --shard I/N`` outputs into one dataset.

``merge-datasets P0 P1 ... --output-prefix OUT`` writes ``OUT_text_document.{bin,idx}`` (and
``OUT_valid_text_document`` when the shards have a validation split) through megatron-core's
``IndexedDatasetBuilder``, plus ``OUT_summary.json`` with the shards' summed counts. The files
equal those of the same preprocess run as one job. This module only parses and calls
:func:`megatron_qk.data.merge.merge_datasets`.
"""

from __future__ import annotations

import argparse
import sys

from megatron_qk.data.merge import merge_datasets
from megatron_qk.data.readers import PreprocessError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``merge-datasets`` options to ``parser``."""
    parser.add_argument(
        "prefixes",
        nargs="+",
        metavar="PREFIX",
        help="each shard's preprocess --output-prefix (any order; every shard exactly once)",
    )
    parser.add_argument(
        "--output-prefix", required=True, metavar="OUT", help="writes OUT_text_document etc."
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-read the merged index and data against the shards",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merge")


def run(args: argparse.Namespace) -> int:
    """Run ``merge-datasets``; returns 0 on success, 1 when the shards are refused."""
    try:
        summary = merge_datasets(args.prefixes, args.output_prefix, args.verify, args.overwrite)
    except (PreprocessError, OSError) as e:
        print(f"merge-datasets: error: {e}", file=sys.stderr)
        return 1
    rate = (summary["merge_bytes_per_second"] or 0.0) / 1e9
    print(
        f"merge-datasets: {len(summary['merged_from'])} shards, {summary['documents']:,} "
        f"documents, {summary['tokens']:,} tokens, {summary['merge_seconds']:.1f} s "
        f"({rate:.2f} GB/s){', verified' if summary['verified'] else ''} -> "
        f"{summary['train']['prefix'] if summary['train'] else '(no documents)'}"
    )
    return 0
