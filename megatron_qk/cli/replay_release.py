"""``megatron-qk replay-release``: replay the maturity release rule on a run's logged scores.

A pure JSON tool: it reads run directories through :mod:`megatron_qk.analysis.replay_log` and
imports neither torch nor megatron-core.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_qk.analysis.replay_aggregate import aggregate_variants
from megatron_qk.analysis.replay_format import format_aggregate, format_report
from megatron_qk.analysis.replay_log import replay_paths, replay_run


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the replay-release options."""
    parser.add_argument(
        "metrics",
        nargs="+",
        metavar="METRICS.jsonl",
        help="a run's metrics.jsonl, its run directory, or a directory holding runs (links "
        "followed); several runs (e.g. seeds) are replayed one by one and --variants aggregates "
        "them like Table 8",
    )
    parser.add_argument(
        "--arm", help="replay only the runs of this arm (e.g. intervention of a table directory)"
    )
    parser.add_argument("--threshold", type=float, help="lower-copy threshold (absolute mode)")
    parser.add_argument(
        "--threshold-mode",
        choices=("absolute", "over_uniform"),
        help="absolute: lower_copy >= threshold; over_uniform: lower_copy / lower_copy_uniform "
        ">= threshold-ratio",
    )
    parser.add_argument("--threshold-ratio", type=float, help="ratio of over_uniform mode")
    parser.add_argument("--patience", type=int, help="consecutive in-window evaluations")
    parser.add_argument("--min-frac", type=float, help="evaluations before this do not count")
    parser.add_argument("--max-frac", type=float, help="forced release at this fraction")
    parser.add_argument(
        "--rule", help="rule of the run's config to replay (default: its first maturity rule)"
    )
    parser.add_argument(
        "--variants", action="store_true", help="also replay the paper's Table 8 variants"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.epilog = (
        "Settings not given come from the first maturity rule in the config.yaml beside the "
        "metrics file, else the paper's 0.005 / 3 / 0.03 / 0.12."
    )


def run(args: argparse.Namespace) -> int:
    """Replay and print; exit 2 on invalid input, 1 when the replay disagrees with the run."""
    overrides = {
        "threshold": args.threshold,
        "threshold_mode": args.threshold_mode,
        "threshold_ratio": args.threshold_ratio,
        "patience": args.patience,
        "min_frac": args.min_frac,
        "max_frac": args.max_frac,
    }
    try:
        paths = replay_paths(args.metrics, args.arm)
        results = [replay_run(m, args.rule, overrides, args.variants) for m in paths]
    except ValueError as exc:  # ReplayError, or an invalid setting refused by the controller
        print(f"megatron-qk replay-release: error: {exc}", file=sys.stderr)
        return 2
    disagrees = any(r["agrees"] is False for r in results)
    if len(results) == 1:
        result = results[0]
        print(json.dumps(result, indent=2) if args.json else format_report(result))
        return 1 if disagrees else 0
    table = aggregate_variants(results) if args.variants else []
    if args.json:
        print(json.dumps({"runs": results, "variants": table}, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in results))
        if table:
            print("\n" + format_aggregate(table, len(results)))
    return 1 if disagrees else 0
