"""Step time of megatron-qk's control-arm model vs a stock Megatron-Core GPTModel of the same size.

Both models are built in one process, each from its own ``TransformerConfig`` of the same recipe:
ours through ``build_gpt_model`` (split Q/K/V projection, explicit final norm, per-layer init
seeds), the anchor as ``GPTModel(config, get_gpt_layer_local_spec())`` (the TE spec where
Transformer Engine is in use), as a Megatron-Core user would write it. A step is the training
step (``benchmarks/training_step.py``: Float16Module in bf16, Megatron DDP, the recipe's Megatron
optimizer with fp32 master weights, Megatron's schedule) on one micro-batch. The two models
alternate, warm-up steps are discarded and the median of the timed steps is reported; the ratio
ours/stock is the figure to record (target <= 1.02).

Tokens/s, model TFLOP/s and MFU use Megatron-LM's FLOPs formula (``megatron_qk.models.flops``,
docs/THROUGHPUT.md) against ``--peak-tflops`` (default 989, H100/H200 SXM dense bf16).

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
    p.add_argument("--peak-tflops", type=float, default=989.0)
    return p.parse_args(argv)


def main() -> None:
    print(json.dumps(measure(_parse()), indent=2))


def measure(args: argparse.Namespace) -> dict:
    """Build both models, time their training steps, return the JSON record."""
    from benchmarks.training_step import stock_gpt_model, training_step
    from megatron_qk.config.loader import load_config
    from megatron_qk.models.builder import (
        build_gpt_model,
        padded_vocab_size,
        transformer_config_from,
    )
    from megatron_qk.models.flops import flops_per_token, throughput_fields
    from megatron_qk.models.params import count_parameters
    from megatron_qk.models.specs import use_transformer_engine
    from megatron_qk.training.distributed import setup_distributed, teardown_distributed

    overrides = list(args.set)
    if args.preset is None:
        overrides = list(CPU_DEFAULTS) + overrides
    cfg = load_config(args.preset or "tiny", overrides)
    os.environ.pop("WORLD_SIZE", None)
    setup_distributed(cfg)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    use_te = use_transformer_engine(cfg.model)
    ours_config = transformer_config_from(cfg, bf16=args.bf16)
    stock_config = transformer_config_from(cfg, bf16=args.bf16)
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
        "peak_tflops": args.peak_tflops,
        "ours_ms": round(med["ours"] * 1e3, 3),
        "stock_ms": round(med["stock"] * 1e3, 3),
        "ratio_ours_over_stock": round(med["ours"] / med["stock"], 4),
    }
    for name in ("ours", "stock"):
        fields = throughput_fields(tokens, med[name], flops, 1, args.peak_tflops)
        result[f"{name}_tokens_per_s"] = round(fields["tokens_per_second"], 1)
        result[f"{name}_tflops"] = float(f"{fields['tflops_per_gpu']:.4g}")
        result[f"{name}_mfu"] = float(f"{fields['mfu']:.4g}")
    teardown_distributed()
    return result


if __name__ == "__main__":
    main()
