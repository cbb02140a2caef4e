"""``megatron-qk plot RUN_DIR [...] --out DIR``: Figure-3-style mechanism panels as PNG.

The panels are drawn by :func:`megatron_qk.analysis.plot.plot_runs` (matplotlib, no torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_qk.analysis.plot import plot_runs


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the plot options."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", required=True, help="output directory for the PNG files")


def run(args: argparse.Namespace) -> int:
    """Draw the panels and list the files written."""
    try:
        written = plot_runs([Path(p) for p in args.run_dirs], Path(args.out))
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"megatron-qk plot: {exc}") from None
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
