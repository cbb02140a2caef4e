"""Step time of megatron-qk's control-arm model vs a stock Megatron-Core GPTModel of the same size.

Both models are built in one process, each from its own ``TransformerConfig`` of the same recipe:
ours through ``build_gpt_model`` (split Q/K/V projection, explicit final norm, per-layer init
seeds), the anchor as ``GPTModel(config, get_gpt_layer_local_spec())`` (the TE spec where
Transformer Engine is in use), as a Megatron-Core user would write it. A step is the training
step (``benchmarks/training_step.py``: Float16Module in bf16, Megatron DDP, the recipe's Megatron
optimizer with fp32 master weights, Megatron's schedule) on one micro-batch. The two models
alternate, warm-up steps are discarded and the median of the timed steps is reported; the ratio
ours/stock is the figure to record (target <= 1.02).

Both configurations carry the trainer's ``training_speed_flags()`` (TE's fused weight-gradient
accumulation into ``main_grad``, fused RoPE), so the stock fused ``linear_qkv`` is timed with the
fusions training gives it. ``--max-ratio R`` (``tools/gpu_check.sh`` passes docs/BENCHMARKS.md's
1.02) judges the run: ``ok`` is false and the exit code 1 when ours/stock exceeds R.

Tokens/s, model TFLOP/s and MFU use Megatron-LM's FLOPs formula (``megatron_qk.models.flops``,
docs/THROUGHPUT.md) against ``--peak-tflops`` (default: the dense bf16 peak of the device by its
name, ``megatron_qk.models.flops.peak_bf16_tflops``; 989, H100 SXM, on a CPU).

Usage::

    python benchmarks/step_time.py                       # CPU defaults (a small model)
    python benchmarks/step_time.py --preset gpt-270m --micro-batch 8 --bf16   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: benchmarks, megatron_qk

CPU_DEFAULTS = (
    "model.num_layers=4",
    "model.hidden_size=256",
    "model.num_attention_heads=8",
    "model.ffn_hidden_size=1024",
    "model.seq_length=256",
)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="recipe or preset (default: tiny, widened)")
    p.add_argument("--set", action="append", default=[], help="override, e.g. model.ffn=swiglu")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--bf16", action="store_true", help="bf16 params (GPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: by device name")
    p.add_argument("--max-ratio", type=float, default=None, help="fail above this ours/stock")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the JSON record; exit 1 when ``--max-ratio`` is given and exceeded."""
    result = measure(_parse(argv))
    print(json.dumps(result, indent=2))
    return 0 if result.get("ok", True) else 1


def measure(args: argparse.Namespace) -> dict:
    """Build both models, time their training steps, return the JSON record."""
    from benchmarks.training_step import stock_gpt_model, training_step
    from megatron_qk.config.loader import load_config
    from megatron_qk.models.builder import (
        build_gpt_model,
        padded_vocab_size,
        transformer_config_from,
    )
    from megatron_qk.models.flops import flops_per_token, peak_bf16_tflops, throughput_fields
    from megatron_qk.models.params import count_parameters
    from megatron_qk.models.specs import use_transformer_engine
    from megatron_qk.models.speed import training_speed_flags
    from megatron_qk.training.distributed import setup_distributed, teardown_distributed

    overrides = list(args.set)
    if args.preset is None:
        overrides = list(CPU_DEFAULTS) + overrides
    cfg = load_config(args.preset or "tiny", overrides)
    os.environ.pop("WORLD_SIZE", None)
    setup_distributed(cfg)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    use_te = use_transformer_engine(cfg.model)
    # The trainer's flags on both sides (training/loop.py builds its config the same way).
    flags = training_speed_flags(hidden_dropout=cfg.model.hidden_dropout)
    ours_config = transformer_config_from(cfg, bf16=args.bf16, **flags)
    stock_config = transformer_config_from(cfg, bf16=args.bf16, **flags)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak, known_peak = peak_bf16_tflops(device_name)
    if args.peak_tflops is not None:
        peak, known_peak = args.peak_tflops, True
    ours = build_gpt_model(cfg, config=ours_config, init_seed=cfg.training.seed)
    stock = stock_gpt_model(cfg, stock_config, use_te)
    n_ours = count_parameters(ours)
    n_stock = count_parameters(stock)
    assert n_ours["total"] == n_stock["total"], (n_ours, n_stock)
    steps = {
        "ours": training_step(cfg, ours, ours_config, args.micro_batch, device),
        "stock": training_step(cfg, stock, stock_config, args.micro_batch, device),
    }
    times: dict[str, list[float]] = {"ours": [], "stock": []}
    for i in range(args.warmup + args.steps):
        order = ("ours", "stock") if i % 2 == 0 else ("stock", "ours")
        for name in order:
            seconds, _ = steps[name]()
            if i >= args.warmup:
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.micro_batch * cfg.model.seq_length
    flops = flops_per_token(cfg.model, padded_vocab_size(cfg))
    result = {
        "benchmark": "step_time",
        "anchor": "stock megatron.core GPTModel, same recipe, same training step",
        "preset": args.preset or "tiny+cpu-defaults",
        "overrides": overrides,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "impl": "te" if use_te else "local",
        "threads": torch.get_num_threads(),
        "dtype": "bf16" if args.bf16 else "fp32",
        "params": n_ours["total"],
        "micro_batch": args.micro_batch,
        "seq_length": cfg.model.seq_length,
        "steps": args.steps,
        "flops_per_token": flops,
        "speed_flags": flags,
        "peak_tflops": peak,
        "peak_from": "--peak-tflops"
        if args.peak_tflops is not None
        else ("device name" if known_peak else "fallback (H100 SXM): device not in the table"),
        "ours_ms": round(med["ours"] * 1e3, 3),
        "stock_ms": round(med["stock"] * 1e3, 3),
        "ratio_ours_over_stock": round(med["ours"] / med["stock"], 4),
    }
    for name in ("ours", "stock"):
        fields = throughput_fields(tokens, med[name], flops, 1, peak)
        result[f"{name}_tokens_per_s"] = round(fields["tokens_per_second"], 1)
        result[f"{name}_tflops"] = float(f"{fields['tflops_per_gpu']:.4g}")
        result[f"{name}_mfu"] = float(f"{fields['mfu']:.4g}")
    if args.max_ratio is not None:
        result["max_ratio"] = args.max_ratio
        result["ok"] = result["ratio_ours_over_stock"] <= args.max_ratio
    teardown_distributed()
    return result


if __name__ == "__main__":
    sys.exit(main())
