"""``megatron-qk quickstart``: the embedded default job, offline on CPU in about a minute.

It trains the ``tiny`` GPT-style preset (4 layers, width 64) on the synthetic repeated-motif
stream in this process, writes the run directory under ``--out`` and prints the loss curve.
Rerunning resumes (or reports the finished run) instead of starting over.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPARK = " .:-=+*#%@"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the quickstart options."""
    parser.add_argument("--out", default="quickstart-out", help="output directory")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")


def sparkline(values: list[float], width: int = 60) -> str:
    """A one-line text plot of ``values`` (high values are dense characters)."""
    if not values:
        return ""
    step = max(1, len(values) // width)
    sampled = values[::step]
    lo, hi = min(sampled), max(sampled)
    span = (hi - lo) or 1.0
    return "".join(SPARK[int((v - lo) / span * (len(SPARK) - 1))] for v in sampled)


def loss_curve_summary(metrics_path: Path) -> str:
    """Human-readable summary of a run's metrics.jsonl (train curve + eval table)."""
    train, evals = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            train.append(rec)
        elif rec["kind"] == "eval":
            evals.append(rec)
    if not train:
        return "no training steps recorded"
    losses = [r["loss"] for r in train]
    tps = sorted(r["tokens_per_second"] for r in train)
    lines = [
        f"train loss: {losses[0]:.4f} (step {train[0]['step']}) -> {losses[-1]:.4f} "
        f"(step {train[-1]['step']}), median {tps[len(tps) // 2]:,.0f} tokens/s",
        f"curve: [{sparkline(losses)}]",
        "",
        "| step | tokens | val_loss | val_ppl |",
        "|---:|---:|---:|---:|",
    ]
    for r in evals:
        lines.append(
            f"| {r['step']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Train the tiny preset and print its loss curve summary."""
    from megatron_qk.config.loader import load_config
    from megatron_qk.training.entry import train_from_config

    out = Path(args.out)
    run_dir = out / "tiny-control"
    cfg = load_config(
        "tiny",
        [f"training.output_dir={run_dir}", f"training.train_steps={args.steps}"],
    )
    summary = train_from_config(cfg)
    print(loss_curve_summary(run_dir / "metrics.jsonl"))
    if summary:
        print(
            f"\nfinal val_loss {summary['final_val_loss']:.4f}, ppl {summary['final_val_ppl']:.2f}"
            f" after {summary['steps']} steps; run directory: {run_dir}"
        )
    return 0
