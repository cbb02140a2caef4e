"""``megatron-qk quickstart``: the embedded default job, offline on CPU.

The stages are :mod:`megatron_qk.quickstart`; this module parses the options and reports.
"""

from __future__ import annotations

import argparse

from megatron_qk.config.loader import load_config


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the quickstart options."""
    steps = load_config("quickstart").training.train_steps
    parser.add_argument(
        "--out", default="quickstart-out", help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per arm, at least 10 (default: the quickstart preset's, {steps})",
    )
    parser.add_argument(
        "--data",
        choices=("python-docs", "fineweb-edu"),
        default="python-docs",
        help="python-docs: offline, Python's own documentation; fineweb-edu: a hub sample "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--fineweb-docs",
        type=int,
        default=20000,
        help="documents taken with --data fineweb-edu (default: %(default)s)",
    )
    parser.add_argument(
        "--nproc", type=int, default=2, help="processes per training run (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="training seed of both arms (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    """Run every stage and print the report's path."""
    if args.steps is not None and args.steps < 10:
        raise SystemExit("megatron-qk quickstart: --steps must be >= 10")
    # torch and megatron-core (seconds): imported here so that --help stays instant.
    from megatron_qk.quickstart import run_quickstart

    report = run_quickstart(args)
    print(f"\nreport: {report}")
    return 0
