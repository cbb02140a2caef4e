"""Markdown tables of the beyond-the-paper study (docs/BEYOND_QK.md) from ``ARM-sSEED`` runs.

    python tools/beyond_qk_tables.py RUNS_DIR [--at 0.03] [--control control]

For each arm found in ``RUNS_DIR`` (directories ``<arm>-s<seed>`` with ``metrics.jsonl``): the
seeds that finished, the final validation loss (mean ± sample sd over seeds), the paired
difference to the control (per seed, then averaged, over the seeds both finished), the upper
attention entropy and upper logit RMS at the evaluation nearest ``--at`` of the planned steps,
the release step of the first rule, and, where train lines carry it (QK-clip, or
``optim.qk_clip.log_only``), the step's max attention logit: its largest value over the run, its
value at 12% of training and the number of steps above the run's clip threshold.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import yaml


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def load_run(run_dir: Path, at: float) -> dict:
    """The facts of one run the tables need."""
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    planned = cfg["training"]["train_steps"]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    diags = [r for r in records if r.get("kind") == "diag"]
    target = at * planned
    diag = min(diags, key=lambda d: (abs(d["step"] - target), d["step"])) if diags else None
    train = [r for r in records if r.get("kind") == "train"]
    logits = [(r["step"], r["max_attention_logit"]) for r in train if "max_attention_logit" in r]
    clip = cfg["optim"].get("qk_clip") or {}
    threshold = clip.get("threshold") if clip.get("enabled") else None
    at_12 = [v for s, v in logits if s == round(0.12 * planned)]
    release = next((r for r in records if r.get("kind") == "release"), None)
    return {
        "finished": bool(summary.get("finished")),
        "final_val_loss": summary.get("final_val_loss") if summary.get("finished") else None,
        "diag_step": None if diag is None else diag["step"],
        "upper_entropy": None if diag is None else diag.get("upper_entropy"),
        "upper_logit": None if diag is None else diag.get("upper_logit"),
        "release": None if release is None else (release["step"], release["reason"]),
        "max_logit": max((v for _, v in logits), default=None),
        "max_logit_12": at_12[0] if at_12 else None,
        "clipped_steps": None if threshold is None else sum(v > threshold for _, v in logits),
        "logged_steps": len(logits),
    }


def arms_of(runs_dir: Path, at: float) -> dict[str, dict[int, dict]]:
    """``{arm: {seed: run facts}}`` of the ``<arm>-s<seed>`` directories in ``runs_dir``."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(runs_dir.iterdir()):
        match = re.fullmatch(r"(.+)-s(\d+)", path.name)
        if match and (path / "metrics.jsonl").is_file():
            out.setdefault(match[1], {})[int(match[2])] = load_run(path, at)
    return out


def format_tables(arms: dict[str, dict[int, dict]], control: str, at: float) -> str:
    """The study's two markdown tables."""
    ctrl = arms.get(control, {})
    lines = [
        f"| arm | seeds finished | final val loss | paired diff vs {control} (seeds) "
        f"| upper entropy @{at:g} | upper logit RMS @{at:g} | release (step, reason) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for arm, runs in arms.items():
        done = sorted(s for s, r in runs.items() if r["finished"])
        paired = [s for s in done if s in ctrl and ctrl[s]["finished"]]
        diffs = [runs[s]["final_val_loss"] - ctrl[s]["final_val_loss"] for s in paired]
        diff = "-" if arm == control else f"{_mean_sd(diffs)} ({len(paired)})"
        steps = sorted({r["diag_step"] for r in runs.values() if r["diag_step"] is not None})
        releases = sorted({r["release"] for r in runs.values() if r["release"]})
        lines.append(
            f"| {arm} | {', '.join(map(str, done)) or 'none'} "
            f"| {_mean_sd([runs[s]['final_val_loss'] for s in done])} | {diff} "
            f"| {_mean_sd([r['upper_entropy'] for r in runs.values()])} (step "
            f"{'/'.join(map(str, steps))}) | {_mean_sd([r['upper_logit'] for r in runs.values()])} "
            f"| {'; '.join(f'{s} {why}' for s, why in releases) or '-'} |"
        )
    lines += [
        "",
        "| arm | seed | max attention logit (run max) | at 12% | steps above the clip threshold |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm, runs in arms.items():
        for seed, r in sorted(runs.items()):
            if r["logged_steps"]:
                clipped = "-" if r["clipped_steps"] is None else str(r["clipped_steps"])
                at_12 = "n/a" if r["max_logit_12"] is None else f"{r['max_logit_12']:.2f}"
                lines.append(
                    f"| {arm} | {seed} | {r['max_logit']:.2f} | {at_12} "
                    f"| {clipped} of {r['logged_steps']} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the tables of RUNS_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--at", type=float, default=0.03, help="fraction of training (0.03)")
    parser.add_argument("--control", default="control", help="the control arm (control)")
    args = parser.parse_args(argv)
    arms = arms_of(args.runs_dir, args.at)
    if not arms:
        print(f"beyond_qk_tables: no <arm>-s<seed> runs in {args.runs_dir}", file=sys.stderr)
        return 2
    print(format_tables(arms, args.control, args.at))
    return 0


if __name__ == "__main__":
    sys.exit(main())
