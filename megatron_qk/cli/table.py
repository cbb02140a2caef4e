"""``megatron-qk table TABLE``: train (or link) every run of a paper table, then print its tables.

What ``examples/launch/run_table.sh`` runs; see :mod:`megatron_qk.analysis.table_runner` for the
runs and :mod:`megatron_qk.analysis.table_plan` for ``--plan``. ``TABLE`` is a directory or a
name under ``examples/configs`` (``all`` with ``--plan``: every paper table).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from megatron_qk.analysis.table_plan import (
    DEFAULT_MFU,
    build_plan,
    format_plan,
    resolve_tables,
)
from megatron_qk.analysis.table_runner import TableError, run_cli_command, run_table
from megatron_qk.config.errors import ConfigError
from megatron_qk.models.flops import H100_BF16_DENSE_TFLOPS


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the table options."""
    parser.add_argument("table", help="table directory or name under examples/configs (or all)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go (runs)")
    parser.add_argument("--seeds", help='seeds instead of the table\'s seeds file, e.g. "1 2 3"')
    parser.add_argument(
        "--separate",
        action="store_true",
        help="train an arm identical to another table's run apart from its label as a run of "
        "its own (default: link it)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every recipe in this process at a tiny shape and 20 steps, every other setting "
        "kept, synthetic data; the downstream evaluation offline on stand-in tasks; then the "
        "analysis",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    parser.add_argument(
        "--plan", action="store_true", help="print every distinct run once and its GPU-hours"
    )
    parser.add_argument(
        "--mfu", type=float, default=DEFAULT_MFU, help=f"MFU of --plan (default {DEFAULT_MFU})"
    )
    parser.add_argument(
        "--peak",
        type=float,
        default=H100_BF16_DENSE_TFLOPS,
        help=f"GPU peak TFLOP/s of --plan (default {H100_BF16_DENSE_TFLOPS:g}, H100 bf16 dense)",
    )


def run(args: argparse.Namespace) -> int:
    """Plan, or run the table; exit 2 with the reason when a table cannot be produced."""
    from megatron_qk.cli import main  # the registry imports this module: import it at run time

    if args.plan and not (0 < args.mfu <= 1 and args.peak > 0):
        print("megatron-qk table: error: --mfu must be in (0, 1] and --peak > 0", file=sys.stderr)
        return 2
    try:
        tables = resolve_tables([] if args.table == "all" else [args.table])
        if args.plan:
            plan = build_plan(tables, args.runs_dir, args.seeds, args.overrides, args.separate)
            print(format_plan(plan, args.mfu, args.peak))
            return 0
        if len(tables) != 1:
            raise ValueError("TABLE all is for --plan; run the tables one by one")
        run_table(
            tables[0],
            Path(args.runs_dir),
            functools.partial(run_cli_command, main),
            seeds=args.seeds,
            overrides=args.overrides,
            separate=args.separate,
            smoke=args.smoke,
            dry_run=args.dry_run,
        )
    except (TableError, ValueError, ConfigError) as exc:
        print(f"megatron-qk table: error: {exc}", file=sys.stderr)
        return 2
    return 0
