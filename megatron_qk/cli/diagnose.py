"""``megatron-qk diagnose``: the mechanism probes, Q/K ablation and locality on checkpoints.

The computation is :mod:`megatron_qk.analysis.diagnose`; this module parses the options, resolves
the checkpoint(s) and reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_qk.diagnostics.ablation_budget import (
    ABLATION_MAX_SEQUENCES,
    ABLATION_MIN_SEQUENCES,
    TARGET_SE,
)
from megatron_qk.rundir.cli_args import add_checkpoint_argument
from megatron_qk.rundir.layout import DIAGNOSE_FILE, list_checkpoints, resolve_checkpoint


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the diagnose options."""
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--data",
        default=None,
        metavar="PREFIX",
        help="held-out Megatron indexed dataset prefix (PREFIX.bin/.idx); default: the run's "
        "own validation data",
    )
    parser.add_argument(
        "--out", default=None, help=f"output JSON (default: RUN_DIR/{DIAGNOSE_FILE})"
    )
    parser.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="diagnose every checkpoint of the run (for the ablation-over-training panel)",
    )
    parser.add_argument(
        "--num-sequences",
        type=int,
        default=None,
        help="held-out sequences of the probes (default: the run's diagnostics.num_sequences, "
        "the sample its training diag lines read: 128 in the paper recipes)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument(
        "--ablation-sequences",
        type=int,
        default=ABLATION_MAX_SEQUENCES,
        help="most held-out sequences for the upper-Q/K ablation (default "
        f"{ABLATION_MAX_SEQUENCES}; capped at the run's validation samples)",
    )
    parser.add_argument(
        "--ablation-min-sequences",
        type=int,
        default=ABLATION_MIN_SEQUENCES,
        help=f"fewest ablation sequences (default {ABLATION_MIN_SEQUENCES})",
    )
    parser.add_argument(
        "--ablation-target-se",
        type=float,
        default=TARGET_SE,
        help="stop adding ablation sequences once every ppl-increase standard error is below "
        f"this (default {TARGET_SE}: 10%% of the paper's smallest 270M effect, +0.35 ppl)",
    )
    parser.add_argument(
        "--locality-rank",
        type=int,
        default=None,
        help="dimension of the estimated immature subspace P (default: the head dimension)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=256, help="query rows per attention chunk"
    )


def run(args: argparse.Namespace) -> int:
    """Diagnose one or all checkpoints and merge the results into the output JSON."""
    # torch and megatron-core (seconds): imported here so that --help stays instant.
    from megatron_qk.analysis.diagnose import diagnose_checkpoints
    from megatron_qk.training.distributed import teardown_distributed

    sizes = (args.num_sequences or 1, args.batch_size, args.ablation_sequences)
    if min(sizes) < 1:
        raise SystemExit("megatron-qk diagnose: --num-sequences and --batch-size must be >= 1")
    try:
        ckpt, run_dir = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as exc:
        raise SystemExit(f"megatron-qk diagnose: {exc}") from None
    checkpoints = list_checkpoints(run_dir / "checkpoints") if args.all_checkpoints else [ckpt]
    out = Path(args.out) if args.out else run_dir / DIAGNOSE_FILE
    try:
        results = diagnose_checkpoints(
            checkpoints,
            run_dir,
            out,
            args.data,
            args.num_sequences,
            args.batch_size,
            args.locality_rank,
            args.chunk_size,
            ablation_sequences=args.ablation_sequences,
            ablation_min_sequences=args.ablation_min_sequences,
            ablation_target_se=args.ablation_target_se,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"megatron-qk diagnose: {exc}") from None
    finally:
        teardown_distributed()
    print(f"wrote {out} ({len(results)} checkpoint(s))")
    return 0
