"""``megatron-qk readout``: the paper's @3%/@20% readout columns, table views and Figure 2.

Reads run directories only (no torch, no checkpoint): see :mod:`megatron_qk.analysis.readout`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_qk.analysis.figure2 import figure2
from megatron_qk.analysis.readout import ReadoutError, format_report, readout


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the readout options."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or parents")
    parser.add_argument(
        "--at",
        type=float,
        action="append",
        metavar="FRAC",
        help="training fraction to read (repeatable; default 0.03)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument(
        "--figure2",
        metavar="PNG",
        help="plot Figure 2 over the groups (the table directories the runs were found in)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the readout tables; exit 2 on unreadable input."""
    fracs = args.at or [0.03]
    if any(not 0.0 <= f <= 1.0 for f in fracs):
        print("megatron-qk readout: error: --at must be in [0, 1]", file=sys.stderr)
        return 2
    try:
        result = readout(args.run_dirs, fracs)
        if args.figure2:
            figure2(result, Path(args.figure2))
    except ReadoutError as exc:
        print(f"megatron-qk readout: error: {exc}", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"megatron-qk readout: warning: {warning}", file=sys.stderr)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
