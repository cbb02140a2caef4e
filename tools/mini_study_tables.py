"""Markdown tables of the mini study (docs/MINI_STUDY.md) from paired control/intervention runs.

    python tools/mini_study_tables.py DIR [DIR ...] [--ratio 1.3]

Each DIR holds ``control/`` and ``intervention/`` run directories of one seed, or (the
``run_table.sh`` layout) ``control-sN`` and ``intervention-sN`` pairs of several seeds (their
``metrics.jsonl``, and ``diagnose.json`` from ``megatron-qk diagnose --all-checkpoints``). Runs
may stop early (``training.exit_after_steps``): every table uses only the steps both arms of a
pair reached. Spreads are the sample standard deviation over seeds (n - 1); the paired loss
difference is intervention minus control, per seed, then averaged.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ARMS = ("control", "intervention")
READOUTS = ("upper_entropy", "upper_logit", "logit_ratio", "copy_ratio")


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _load_pair(pair: Path, control: Path, intervention: Path) -> dict:
    out = {}
    for arm, run_dir in zip(ARMS, (control, intervention), strict=True):
        if not (run_dir / "metrics.jsonl").exists():
            raise SystemExit(f"mini_study_tables: {run_dir} has no metrics.jsonl")
        recs = _records(run_dir)
        diag = {r["step"]: r for r in recs if r["kind"] == "diag"}
        for r in diag.values():
            base = r.get("lower_copy_uniform")
            r["copy_ratio"] = r["lower_copy"] / base if base else math.nan
        evals = {r["step"]: r for r in recs if r["kind"] == "eval"}
        releases = [r for r in recs if r["kind"] == "release"]
        path = run_dir / "diagnose.json"
        ablation = {}
        if path.exists():
            for r in json.loads(path.read_text(encoding="utf-8"))["results"]:
                ablation[r["step"]] = r
        planned = round(max(r["step"] / r["frac"] for r in recs if r.get("frac")))
        out[arm] = dict(diag=diag, evals=evals, releases=releases, ablation=ablation)
    out["planned"] = planned
    common = set(out["control"]["evals"]) & set(out["intervention"]["evals"])
    out["common_steps"] = sorted(common)
    return out


def tables(pairs: dict[str, dict], ratio: float) -> list[str]:
    """The study's markdown tables."""
    planned = {p["planned"] for p in pairs.values()}
    assert len(planned) == 1, f"pairs plan different lengths: {planned}"
    planned = planned.pop()
    last = min(p["common_steps"][-1] for p in pairs.values())
    lines = [f"Seeds: {', '.join(pairs)}; planned steps {planned}; compared through step {last}."]
    # Validation loss and the paired difference.
    lines += ["", "| step (frac) | control val loss | intervention val loss | paired diff |"]
    lines += ["|---|---:|---:|---:|"]
    steps = [s for s in next(iter(pairs.values()))["common_steps"] if 0 < s <= last]
    for step in steps[1::2] if len(steps) > 8 else steps:
        c = [p["control"]["evals"][step]["val_loss"] for p in pairs.values()]
        i = [p["intervention"]["evals"][step]["val_loss"] for p in pairs.values()]
        d = [b - a for a, b in zip(c, i, strict=True)]
        lines.append(f"| {step} ({step / planned:.2f}) | {_ms(c)} | {_ms(i)} | {_ms(d)} |")
    # Release points.
    lines += ["", "| seed | release step (frac) | reason | score at release | threshold |"]
    lines += ["|---|---:|---|---:|---:|"]
    for seed, p in pairs.items():
        for r in p["intervention"]["releases"]:
            score = "n/a" if r.get("score") is None else f"{r['score']:.3f}"
            lines.append(
                f"| {seed} | {r['step']} ({r['frac']:.3f}) | {r['reason']} | {score} | "
                f"{r.get('threshold')} |"
            )
    # Control: sharpening before maturity.
    lines += ["", "| seed | arm | first step upper entropy < 0.7 | first step copy ratio >= "]
    lines[-1] += f"{ratio} | copy ratio min (step) |"
    lines += ["|---|---|---:|---:|---:|"]
    for seed, p in pairs.items():
        for arm in ARMS:
            diag = [p[arm]["diag"][s] for s in sorted(p[arm]["diag"]) if s <= last]
            sharp = next((d["step"] for d in diag if d["upper_entropy"] < 0.7), None)
            mature = next((d["step"] for d in diag if d["copy_ratio"] >= ratio), None)
            low = min(diag, key=lambda d: d["copy_ratio"])
            lines.append(
                f"| {seed} | {arm} | {sharp if sharp is not None else 'not reached'} | "
                f"{mature if mature is not None else 'not reached'} | "
                f"{low['copy_ratio']:.3f} ({low['step']}) |"
            )
    # Readouts at the checkpoints (diagnose.json probes on the same held-out sequences).
    ckpts = sorted(set.intersection(*(set(p[a]["ablation"]) for p in pairs.values() for a in ARMS)))
    lines += ["", "| checkpoint step (frac) | readout | control | intervention |"]
    lines += ["|---|---|---:|---:|"]
    for step in ckpts:
        for key in READOUTS:
            vals = {arm: [] for arm in ARMS}
            for p in pairs.values():
                for arm in ARMS:
                    probes = p[arm]["ablation"][step]["probes"]
                    if key == "copy_ratio":
                        vals[arm].append(probes["lower_copy"] / probes["lower_copy_uniform"])
                    else:
                        vals[arm].append(probes[key])
            lines.append(
                f"| {step} ({step / planned:.2f}) | {key} | {_ms(vals['control'])} | "
                f"{_ms(vals['intervention'])} |"
            )
    # Ablation over checkpoints: loss increase (nats) with upper Q and K zeroed.
    lines += ["", "| checkpoint step (frac) | control Δloss, upper Q/K zeroed | intervention "]
    lines[-1] += "Δloss | control Δppl | intervention Δppl |"
    lines += ["|---|---:|---:|---:|---:|"]
    for step in ckpts:
        cells = []
        for field in ("loss", "ppl"):
            for arm in ARMS:
                vals = []
                for p in pairs.values():
                    a = p[arm]["ablation"][step]["ablation"]
                    base = a["base_loss"] if field == "loss" else a["base_ppl"]
                    vals.append(a["qk"][field] - base)
                cells.append(_ms(vals))
        lines.append(f"| {step} ({step / planned:.2f}) | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "pairs", nargs="+", type=Path, help="directories with control/ and intervention/"
    )
    parser.add_argument("--ratio", type=float, default=1.3, help="maturity ratio for the table")
    args = parser.parse_args(argv)
    pairs = {}
    for pair in args.pairs:
        if (pair / "control").is_dir():
            pairs[pair.name] = _load_pair(pair, pair / "control", pair / "intervention")
            continue
        # run_table.sh layout: control-sN and intervention-sN side by side.
        for control in sorted(pair.glob("control-s*")):
            seed = control.name.removeprefix("control-")
            pairs[seed] = _load_pair(pair, control, pair / f"intervention-{seed}")
    if not pairs:
        print(f"mini_study_tables: no control/intervention runs in {args.pairs}", file=sys.stderr)
        return 2
    print("\n".join(tables(pairs, args.ratio)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
