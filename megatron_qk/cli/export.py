"""``megatron-qk export``: write a checkpoint as a transformers model or a stock Megatron-Core one.

Example::

    megatron-qk export --checkpoint runs/tiny --format hf --out exported/tiny-hf
    megatron-qk export --checkpoint runs/tiny --step 40 --format megatron --out exported/tiny-mcore

What each format holds is described in :mod:`megatron_qk.export.checkpoint_export`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_qk.data.tokenizer import TokenizerError
from megatron_qk.evaluation.suite import EvalError
from megatron_qk.rundir.cli_args import add_checkpoint_argument
from megatron_qk.training.checkpoint_settings import CheckpointMismatchError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the export options."""
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--step", type=int, default=None, help="export the checkpoint taken after this step"
    )
    parser.add_argument(
        "--format",
        choices=("hf", "megatron"),
        required=True,
        help="hf: a transformers model directory (config.json, model.safetensors, tokenizer; "
        "needs the [export] extra); megatron: a stock Megatron-Core torch_dist checkpoint with "
        "the fused linear_qkv",
    )
    parser.add_argument(
        "--out", required=True, help="output directory (must not exist or be empty)"
    )
    parser.add_argument(
        "--tokenizer",
        default="gpt2",
        help="the run's tokenizer, as given to preprocess (default: gpt2); checked against the "
        "run's vocabulary and data summary",
    )


def run(args: argparse.Namespace) -> int:
    """Run the export; 0 on success, 1 for a bad checkpoint, model or output directory."""
    # torch and megatron-core (seconds): imported here so that --help stays instant.
    from megatron_qk.export.checkpoint_export import export_checkpoint
    from megatron_qk.export.hf import ExportError

    try:
        summary = export_checkpoint(
            args.checkpoint, Path(args.out), args.format, args.step, args.tokenizer
        )
    except (
        FileNotFoundError,
        ExportError,
        TokenizerError,
        EvalError,
        CheckpointMismatchError,
    ) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    print(f"export: wrote {args.format} step {summary['step']} to {args.out}")
    return 0
