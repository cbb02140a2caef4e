"""Step time of megatron-qk's control-arm model vs a stock Megatron-Core GPTModel of the same size.

Both models are built in one process from the same ``TransformerConfig``: ours through
``build_gpt_model`` (split Q/K/V projection, explicit final norm, per-layer init seeds), the anchor
as ``GPTModel(config, get_gpt_layer_local_spec())`` (or the TE spec on GPU), exactly as a
Megatron-Core user would write it. A step is forward + backward + AdamW on one micro-batch. The
two models alternate, warm-up steps are discarded and the median of the timed steps is reported;
the ratio ours/stock is the figure to record (target <= 1.02).

On CUDA the script also reports tokens/s and model FLOPs utilisation (6·N·T plus attention
FLOPs, against ``--peak-tflops``, default 989 for H100 SXM bf16 dense).

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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CPU_DEFAULTS = (
    "model.num_layers=4",
    "model.hidden_size=256",
    "model.num_attention_heads=8",
    "model.ffn_hidden_size=1024",
    "model.seq_length=256",
)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="recipe or preset (default: tiny, widened)")
    p.add_argument("--set", action="append", default=[], help="override, e.g. model.ffn=swiglu")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--bf16", action="store_true", help="bf16 params (GPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    return p.parse_args()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _stock_model(cfg, config):
    """The anchor: Megatron-Core's own spec, no megatron-qk code in the model."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron_qk.models.builder import padded_vocab_size
    from megatron_qk.models.specs import use_transformer_engine

    norm = "RMSNorm" if cfg.model.normalization == "rmsnorm" else "LayerNorm"
    if use_transformer_engine(cfg.model):
        spec = get_gpt_layer_with_transformer_engine_spec(normalization=norm)
    else:
        spec = get_gpt_layer_local_spec(normalization=norm)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(cfg),
        max_sequence_length=cfg.model.seq_length,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
    )


def _step_fn(model, cfg, micro_batch: int, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    shape = (micro_batch, cfg.model.seq_length)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device)
    labels = torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device)
    pos = torch.arange(cfg.model.seq_length, device=device).expand(micro_batch, -1)

    def step() -> float:
        _sync()
        start = time.perf_counter()
        loss = model(tokens, pos, attention_mask=None, labels=labels).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        return time.perf_counter() - start

    return step


def _flops_per_token(cfg, n_params_non_embedding: int) -> float:
    m = cfg.model
    attention = 12 * m.num_layers * m.hidden_size * m.seq_length  # QK^T and AV, fwd+bwd
    return 6 * n_params_non_embedding + attention


def main() -> None:
    args = _parse()
    from megatron_qk.config.loader import load_config
    from megatron_qk.models.builder import build_gpt_model, transformer_config_from
    from megatron_qk.models.params import count_parameters
    from megatron_qk.training.distributed import setup_distributed, teardown_distributed

    overrides = list(args.set)
    if args.preset is None:
        overrides = list(CPU_DEFAULTS) + overrides
    cfg = load_config(args.preset or "tiny", overrides)
    os.environ.pop("WORLD_SIZE", None)
    setup_distributed(cfg)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    config = transformer_config_from(cfg, bf16=args.bf16)
    ours = build_gpt_model(cfg, config=config, init_seed=cfg.training.seed).to(device)
    stock = _stock_model(cfg, config).to(device)
    n_ours = count_parameters(ours)
    n_stock = count_parameters(stock)
    assert n_ours["total"] == n_stock["total"], (n_ours, n_stock)
    steps = {
        "ours": _step_fn(ours, cfg, args.micro_batch, device),
        "stock": _step_fn(stock, cfg, args.micro_batch, device),
    }
    times: dict[str, list[float]] = {"ours": [], "stock": []}
    for i in range(args.warmup + args.steps):
        order = ("ours", "stock") if i % 2 == 0 else ("stock", "ours")
        for name in order:
            t = steps[name]()
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.micro_batch * cfg.model.seq_length
    result = {
        "benchmark": "step_time",
        "anchor": "stock megatron.core GPTModel, same TransformerConfig",
        "preset": args.preset or "tiny+cpu-defaults",
        "overrides": overrides,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": "bf16" if args.bf16 else "fp32",
        "params": n_ours["total"],
        "micro_batch": args.micro_batch,
        "seq_length": cfg.model.seq_length,
        "steps": args.steps,
        "ours_ms": round(med["ours"] * 1e3, 3),
        "stock_ms": round(med["stock"] * 1e3, 3),
        "ratio_ours_over_stock": round(med["ours"] / med["stock"], 4),
        "ours_tokens_per_s": round(tokens / med["ours"], 1),
        "stock_tokens_per_s": round(tokens / med["stock"], 1),
    }
    if device.type == "cuda":
        flops = _flops_per_token(cfg, n_ours["total"] - n_ours["embedding"])
        result["ours_mfu"] = round(flops * tokens / med["ours"] / (args.peak_tflops * 1e12), 4)
        result["stock_mfu"] = round(flops * tokens / med["stock"] / (args.peak_tflops * 1e12), 4)
    print(json.dumps(result, indent=2))
    teardown_distributed()


if __name__ == "__main__":
    main()
