"""Command-line arguments that name things in a run directory, shared by the subcommands."""

from __future__ import annotations

import argparse


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``: the forms ``rundir.layout.resolve_checkpoint`` accepts."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (newest checkpoint), its checkpoints/ or one iter_XXXXXXX directory",
    )
