"""Python half of ``tools/gpu_check.sh``: the GPU-path checks that need code, one JSON each.

Checks (``--check NAME``, repeatable; default all):

* ``te_vs_local``: our model built with the Transformer Engine spec and with the local spec, in
  fp32, on the same weights: the local model's weights are moved away from their initialisation,
  then copied by canonical checkpoint key. Every layer's hidden states and the logits must agree
  within a tolerance derived from TF32 rounding (TE runs fp32 GEMMs as TF32), and the negative
  control, the same comparison after a wrong mapping (W_Q and W_K swapped, ``fc2`` negated),
  must fail it (``gpu_check_numerics.py``).
* ``checkpoint_round_trip``: a checkpoint written by the TE model (``dist_checkpointing``,
  canonical layout) loads into the local model built for the CPU (torch kernels only, whatever
  the host has installed) with fp32 logits equal to rounding.
* ``dry_run``: ``megatron-qk train --dry-run``'s builder with ``model.impl`` resolved on this host.
* ``cuda1``: a model built for ``cuda:1`` runs there (RoPE's ``inv_freq`` on the current device);
  skipped with a reason on a one-GPU host.
* ``step_time``: ``benchmarks/step_time.py``: tokens/s and MFU (Megatron-LM's formula, the peak
  read from the device name) of our model and of stock Megatron-Core ``GPTModel`` with the same
  spec and the trainer's speed flags; fails when ours/stock exceeds ``--max-step-ratio``
  (docs/BENCHMARKS.md's target, 1.02).
* ``resume``: ``benchmarks/resume_equality.py --enforce``: save -> preempt (SIGUSR1, exit 75) ->
  resume with the distributed optimizer on one device against the uninterrupted run, and with
  two or more GPUs a resume under TP=2 with sequence parallelism.

``--dry-run`` runs every check on the CPU with a tiny model and the local spec on both sides (the
TE side cannot exist there); it exercises the code, not the GPU. ``--merge FILE...`` folds the
JSON files of a ``gpu_check.sh`` run into the one summary the script prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # gpu_check_numerics beside this file

#: docs/BENCHMARKS.md's target for the 270M bf16 TE step time against stock Megatron-Core.
MAX_STEP_RATIO = 1.02
CHECKS = ("dry_run", "te_vs_local", "checkpoint_round_trip", "cuda1", "step_time", "resume")
TINY = (
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=64",
    "model.seq_length=32",
    "model.vocab_size=64",
    "model.vocab_pad_multiple=8",
)


def _config(args, impl: str | None = None):
    from megatron_qk.config.loader import load_config

    overrides = [*(TINY if args.dry_run else ()), *args.set]
    if impl is not None:
        overrides.append(f"model.impl={impl}")
    return load_config(args.preset, overrides)


def _te_impl(args) -> str:
    """The impl of the "TE" side: te on a GPU run, local in the CPU dry run."""
    return "local" if args.dry_run else "te"


def _batches(cfg, count: int, micro_batch: int, device) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1234)
    shape = (micro_batch, cfg.model.seq_length)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device)
        labels = torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device)
        pos = torch.arange(shape[1], device=device).expand(micro_batch, -1)
        out.append((tokens, pos, labels))
    return out


@torch.no_grad()
def _losses(model, batches) -> list[float]:
    return [model(t, p, attention_mask=None, labels=y).float().mean().item() for t, p, y in batches]


def _build(cfg, bf16: bool, device):
    from megatron.core.transformer.module import Float16Module

    from megatron_qk.models.builder import build_gpt_model, transformer_config_from

    config = transformer_config_from(cfg, bf16=bf16)
    model = build_gpt_model(cfg, config=config, init_seed=cfg.training.seed, device=device)
    model = model.to(device)
    if bf16:
        model = Float16Module(config, model)
    return model.eval()


def check_te_vs_local(args) -> dict:
    import gpu_check_numerics as numerics

    from megatron_qk.models.checkpoint_layout import copy_canonical_weights
    from megatron_qk.training.checkpoint import unwrap_model

    device = _device(args)
    local = _build(_config(args, "local"), False, device)
    te = _build(_config(args, _te_impl(args)), False, device)
    moved = numerics.perturb_canonical(local, seed=args.seed)
    copied = copy_canonical_weights(unwrap_model(local), unwrap_model(te))
    tokens = _batches(_config(args), 1, min(args.micro_batch, 2), device)[0][0]
    result = numerics.compare(local, te, tokens)
    changed = numerics.wrong_mapping(te)
    control = numerics.compare(local, te, tokens)
    return {
        "check": "te_vs_local",
        "dtype": "fp32 (TE: TF32 GEMMs)",
        "tensors_moved": moved,
        "tensors_copied": copied,
        **result,
        "negative_control": {
            "mapping": "W_Q <-> W_K swapped, fc2 negated",
            "tensors_changed": changed,
            "worst_ratio": control["worst_ratio"],
            "failed_as_it_must": not control["ok"],
        },
        "ok": result["ok"] and changed > 0 and not control["ok"],
    }


def check_checkpoint_round_trip(args) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_qk.models.checkpoint_layout import (
        canonical_sharded_state_dict,
        load_canonical_state_dict,
    )

    device = _device(args)
    te = _build(_config(args, _te_impl(args)), False, device)
    # Built for the CPU: no apex/TE kernel even where the host has them (they need CUDA).
    local = _build(_config(args, "local"), False, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        dist_checkpointing.save({"model": canonical_sharded_state_dict(te)}, tmp)
        loaded = dist_checkpointing.load({"model": canonical_sharded_state_dict(local)}, tmp)
    load_canonical_state_dict(local, loaded["model"])
    cfg = _config(args)
    batch = _batches(cfg, 1, args.micro_batch, torch.device("cpu"))[0]
    with torch.no_grad():
        want = te(*(x.to(device) for x in batch[:2]), attention_mask=None).float().cpu()
        got = local(*batch[:2], attention_mask=None).float()
    # fp32 on both sides; TE vs torch kernels differ by accumulation order only.
    diff = ((got - want).abs().max() / want.abs().max()).item()
    return {"check": "checkpoint_round_trip", "max_rel_logit_diff": diff, "ok": diff <= 1e-4}


def check_dry_run(args) -> dict:
    from megatron_qk.models.specs import use_transformer_engine
    from megatron_qk.training.entry import dry_run

    cfg = _config(args, None if args.dry_run else "auto")
    report = dry_run(cfg)
    ok = report["parameters"]["total"] == report["expected_parameters"]
    return {
        "check": "dry_run",
        "impl": "te" if use_transformer_engine(cfg.model) else "local",
        "parameters": report["parameters"]["total"],
        "ok": ok,
    }


def check_cuda1(args) -> dict:
    if args.dry_run or torch.cuda.device_count() < 2:
        return {"check": "cuda1", "skipped": "needs 2 GPUs", "ok": None}
    from megatron_qk.training.restore import select_device

    device = select_device("cuda:1")
    model = _build(_config(args), True, device)
    batch = _batches(_config(args), 1, args.micro_batch, device)[0]
    loss = _losses(model, [batch])[0]
    return {
        "check": "cuda1",
        "current_device": torch.cuda.current_device(),
        "loss": loss,
        "ok": torch.cuda.current_device() == 1 and loss == loss,
    }


def check_step_time(args) -> dict:
    from benchmarks import step_time

    argv = ["--preset", args.preset, "--micro-batch", str(args.micro_batch)]
    argv += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    argv += ["--max-ratio", str(args.max_step_ratio)]
    if args.peak_tflops is not None:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    for item in [*(TINY if args.dry_run else ()), *args.set]:
        argv += ["--set", item]
    if not args.dry_run:
        argv.append("--bf16")
    return {"check": "step_time", **step_time.measure(step_time._parse(argv))}


def check_resume(args) -> dict:
    """benchmarks/resume_equality.py --enforce in child processes (the CLI, as users run it)."""
    import subprocess

    scenarios = ["preempt"]
    if not args.dry_run and torch.cuda.device_count() >= 2:
        scenarios.append("tp2_sp")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "resume_equality.py"), "--enforce"]
    cmd += ["--scenarios", *scenarios]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"check": "resume", "ok": False, "rc": proc.returncode, "error": proc.stderr[-2000:]}
    report.pop("benchmark", None)
    skipped = None if "tp2_sp" in scenarios else "TP=2/SP needs 2 GPUs"
    return {"check": "resume", "scenarios": scenarios, "tp2_sp_skipped": skipped, **report}


def _device(args) -> torch.device:
    if args.dry_run or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def run_checks(args) -> list[dict]:
    """Run the selected checks in one process group; each check's failure is recorded."""
    from megatron_qk.training.distributed import setup_distributed, teardown_distributed

    os.environ.pop("WORLD_SIZE", None)
    results = []
    for name in args.check or CHECKS:
        start = time.perf_counter()
        setup_distributed(_config(args))
        try:
            result = globals()[f"check_{name}"](args)
        except Exception as exc:  # a GPU check reports every failure, then goes on
            result = {"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            teardown_distributed()
        result["seconds"] = round(time.perf_counter() - start, 2)
        results.append(result)
    return results


def merge(paths: list[Path]) -> dict:
    """One summary from the JSON files of a gpu_check.sh run (a file may hold a list)."""
    checks = []
    for path in paths:
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            checks.append({"check": path.stem, "ok": False, "error": "no output"})
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            checks.append({"check": path.stem, "ok": False, "error": f"bad JSON: {exc}"})
            continue
        for item in data if isinstance(data, list) else [data]:
            item.setdefault("check", item.get("benchmark", path.stem))
            checks.append(item)
    failed = [c["check"] for c in checks if c.get("ok") is False]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu_check": "megatron-qk", "device": device, "failed": failed, "checks": checks}


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt-270m")
    p.add_argument("--set", action="append", default=[], help="recipe override (repeatable)")
    p.add_argument("--check", action="append", choices=CHECKS, help="run only these checks")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak per GPU (default: from the device name, see models/flops.py)",
    )
    p.add_argument("--max-step-ratio", type=float, default=MAX_STEP_RATIO)
    p.add_argument("--seed", type=int, default=0, help="seed of the weight perturbation")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, local spec only")
    p.add_argument("--merge", nargs="+", type=Path, help="fold these JSON files into a summary")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.dry_run:
        args.micro_batch, args.steps, args.warmup = 2, 1, 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.merge:
        out = merge(args.merge)
    else:
        out = run_checks(args)
    text = json.dumps(out, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    failed = out["failed"] if isinstance(out, dict) else [r for r in out if r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
