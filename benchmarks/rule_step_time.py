"""Training-step time with the paper's ``upper_qk`` rule active vs the control, in one run.

Two full trainers (Megatron DDP, optimizer, scheduler, data) are built in one process from the
same recipe, one with ``optim.rules=[{name: upper_qk}]`` held for the whole measurement. Their
``train_step`` calls alternate (evaluation is never run); warm-up steps are discarded and the
median step time of each is reported with the ratio rule/control (target <= 1.01).

Usage::

    python benchmarks/rule_step_time.py                   # tiny preset, CPU
    python benchmarks/rule_step_time.py --preset gpt-270m --set training.micro_batch_size=8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE = "optim.rules=[{name: upper_qk, release: never}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="timed steps per arm")
    p.add_argument(
        "--max-ratio",
        type=float,
        default=None,
        help="fail (exit 1) above this rule/control ratio (docs/BENCHMARKS.md: 1.01)",
    )
    args = p.parse_args(argv)

    from megatron_qk.config.loader import load_config
    from megatron_qk.training.distributed import setup_distributed, teardown_distributed
    from megatron_qk.training.loop import Trainer

    os.environ.pop("WORLD_SIZE", None)
    total = args.warmup + args.steps + 1
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, extra in (("control", []), ("upper_qk", [RULE])):
            cfg = load_config(
                args.preset,
                [
                    *args.set,
                    *extra,
                    f"training.output_dir={tmp}/{arm}",
                    "training.train_tokens=null",
                    f"training.train_steps={total}",
                    "logging.progress_bar=false",
                ],
            )
            trainers[arm] = Trainer(cfg, setup_distributed(cfg))
        times: dict[str, list[float]] = {arm: [] for arm in trainers}
        for i in range(args.warmup + args.steps):
            order = list(trainers) if i % 2 == 0 else list(reversed(trainers))
            for arm in order:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = time.perf_counter()
                trainers[arm].train_step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times[arm].append(time.perf_counter() - start)
        mult = trainers["upper_qk"].scheduler.multipliers()["upper_qk"]
        assert mult == 0.25, mult  # the rule was active for every timed step
    med = {arm: statistics.median(v) for arm, v in times.items()}
    ratio = round(med["upper_qk"] / med["control"], 4)
    judged = {} if args.max_ratio is None else {"max_ratio": args.max_ratio}
    if judged:
        judged["ok"] = ratio <= args.max_ratio
    print(
        json.dumps(
            {
                "benchmark": "rule_step_time",
                "anchor": "control arm, same recipe, same process",
                "preset": args.preset,
                "overrides": args.set,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "threads": torch.get_num_threads(),
                "steps": args.steps,
                "control_ms": round(med["control"] * 1e3, 3),
                "upper_qk_ms": round(med["upper_qk"] * 1e3, 3),
                "ratio_rule_over_control": ratio,
                **judged,
            },
            indent=2,
        )
    )
    teardown_distributed()
    return 0 if judged.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
