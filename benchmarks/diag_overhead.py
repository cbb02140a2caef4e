"""Cost of the live diagnostics relative to training, in one run (target: <= 2% on 270M).

One trainer is built from the recipe; ``train_step`` and the diagnostics pass
(``HeldOutDiagnostics.measure``: the held-out probe forward with Q/K recomputation, FFN hooks and
the Q/K bilinear SVDs) are timed alternately after warm-up. The validation loss itself is not
counted: the control run computes it too. The anchor is the training time between two evaluations::

    overhead = t_diag / (eval_interval * t_step)

``eval_interval`` is the recipe's. When ``--set`` shrinks the global batch to fit a small machine,
``projected_overhead`` scales ``t_step`` by the recipe's sequences per step over the measured ones
(an extrapolation: step time taken as linear in the batch); on a GPU run the recipe unchanged.

Usage::

    python benchmarks/diag_overhead.py                        # tiny preset, CPU
    python benchmarks/diag_overhead.py --preset gpt-270m      # GPU, bf16, the real recipe
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


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[], help="recipe override (repeatable)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions of each")
    p.add_argument(
        "--max-overhead",
        type=float,
        default=None,
        help="fail (exit 1) when the overhead projected to the recipe's batch exceeds this "
        "fraction (docs/BENCHMARKS.md: 0.02)",
    )
    args = p.parse_args(argv)

    from megatron_qk.config.loader import load_config
    from megatron_qk.training.callbacks.diagnostics import HeldOutDiagnostics
    from megatron_qk.training.distributed import setup_distributed, teardown_distributed
    from megatron_qk.training.loop import Trainer

    os.environ.pop("WORLD_SIZE", None)
    recipe = load_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            args.preset,
            [
                *args.set,
                f"training.output_dir={tmp}/run",
                "training.train_tokens=null",
                f"training.train_steps={args.warmup + args.reps + 1}",
                "logging.progress_bar=false",
                "diagnostics.enabled=true",
            ],
        )
        trainer = Trainer(cfg, setup_distributed(cfg))
        step_times, diag_times = [], []
        for i in range(args.warmup + args.reps):
            step = _timed(trainer.train_step)
            diag = _timed(lambda: HeldOutDiagnostics().measure(trainer))
            if i >= args.warmup:
                step_times.append(step)
                diag_times.append(diag)
        t_step, t_diag = statistics.median(step_times), statistics.median(diag_times)
        measured_batch = cfg.training.global_batch_size
    interval = recipe.training.eval_interval
    recipe_batch = recipe.training.global_batch_size
    overhead = t_diag / (interval * t_step)
    projected = t_diag / (interval * t_step * recipe_batch / measured_batch)
    judged = {} if args.max_overhead is None else {"max_overhead": args.max_overhead}
    if judged:
        judged["ok"] = projected <= args.max_overhead
    print(
        json.dumps(
            {
                "benchmark": "diag_overhead",
                "anchor": "training time between two evaluations, same run",
                "preset": args.preset,
                "overrides": args.set,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "threads": torch.get_num_threads(),
                "reps": args.reps,
                "step_ms": round(t_step * 1e3, 2),
                "diag_ms": round(t_diag * 1e3, 2),
                "diag_sequences": cfg.diagnostics.num_sequences,
                "eval_interval": interval,
                "global_batch_measured": measured_batch,
                "global_batch_recipe": recipe_batch,
                "overhead": round(overhead, 5),
                "projected_overhead": round(projected, 5),
                **judged,
            },
            indent=2,
        )
    )
    teardown_distributed()
    return 0 if judged.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
