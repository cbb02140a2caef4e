"""``megatron-qk compare``: the paired-seed comparison table of finished runs (Table 1).

Reads files only (no torch, no megatron-core): see :mod:`megatron_qk.analysis.compare` for what
is computed and :mod:`megatron_qk.analysis.compare_load` for which runs are accepted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_qk.analysis.compare import DEFAULT_CONTROL, CompareError
from megatron_qk.analysis.compare_format import format_table
from megatron_qk.analysis.compare_load import downstream_table, load_and_compare


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the compare options."""
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="finished run directories, or parent directories holding them",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument(
        "--control",
        default=DEFAULT_CONTROL,
        metavar="ARM",
        help=f"arm the others are compared with (default {DEFAULT_CONTROL})",
    )
    parser.add_argument(
        "--metric",
        choices=("acc", "acc_norm"),
        default="acc",
        help="accuracy the downstream table (Table 2) shows: acc, or acc_norm (length-normalised;"
        " acc for tasks without it); eval.json holds both (default acc)",
    )
    parser.add_argument(
        "--allow-different-data",
        action="store_true",
        help="pair runs even when their summary.json data_order (training order and "
        "validation set) differs",
    )


def run(args: argparse.Namespace) -> int:
    """Print the comparison table (and write ``--json``); exit code 2 on invalid input."""
    try:
        result = load_and_compare(args.run_dirs, args.control, args.allow_different_data)
    except CompareError as exc:
        print(f"megatron-qk compare: error: {exc}", file=sys.stderr)
        return 2
    text = format_table(result)
    try:
        downstream = downstream_table(
            [r for a in result["arms"].values() for r in a["runs"]], args.control, args.metric
        )
    except CompareError as exc:  # Table 1 stands on its own; say why Table 2 is missing
        downstream = None
        print(f"megatron-qk compare: warning: {exc}", file=sys.stderr)
    if downstream is not None:
        text += "\n\n" + downstream[0]
        result["eval_table"] = downstream[1]
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
