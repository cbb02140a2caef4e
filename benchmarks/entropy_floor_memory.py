"""Memory of the entropy-floor term for one 270M upper layer at sequence 1024 (CPU), as JSON.

The entropy floor (Appendix D) differentiates the upper layers' attention entropy, so every
upper layer's attention used to stay in memory from forward to backward: full fp32 ``b x 15 x
1024 x 1024`` matrices and their softmax intermediates. ``normalized_entropy_sum`` now computes
``chunk_size`` query rows at a time under activation checkpointing. For each mode and
micro-batch this measures, in a fresh process:

* ``saved_bytes``: bytes autograd keeps for the backward of the term (unique storages seen by
  ``saved_tensors_hooks``, the layer's query/key inputs excluded: the model keeps them anyway).
  This is what accumulates over the 10 upper layers until the backward reaches them.
* ``peak_bytes``: peak resident memory of forward + backward above the resident memory before
  it (``VmHWM`` after ``/proc/self/clear_refs``; Linux; glibc with a fixed mmap threshold so
  freed tensors leave the resident set).

and projects the Table 6 recipe (micro-batch 16, 10 upper layers) per GPU:
``10 x saved(16) + (peak(16) - saved(16))``, each extrapolated along the line through the
measurements at micro-batches 1 and 2.

    python benchmarks/entropy_floor_memory.py [--micro-batches 1 2] [--chunk-size 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(micro_batch: int, chunk_size: int | None, seq: int, heads: int, head_dim: int) -> dict:
    """Measure one configuration in this (fresh) process."""
    from megatron_qk.diagnostics.probes import normalized_entropy_sum

    torch.manual_seed(0)
    query = torch.randn(seq, micro_batch, heads, head_dim, requires_grad=True)
    key = torch.randn(seq, micro_batch, heads, head_dim, requires_grad=True)
    inputs = {query.untyped_storage().data_ptr(), key.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, count = normalized_entropy_sum(query, key, head_dim**-0.5, chunk_size)
    (total / count).backward()
    peak = _rss("VmHWM") - before
    return {
        "micro_batch": micro_batch,
        "chunk_size": chunk_size,
        "saved_bytes": sum(saved.values()),
        "peak_bytes": peak,
    }


def _linear_at(rows: list[dict], key: str, micro_batch: int) -> float:
    """``rows[key]`` extrapolated to ``micro_batch``: a line through the first and last
    measurement (proportional to the micro-batch when only one was measured)."""
    first, last = rows[0], rows[-1]
    if first["micro_batch"] == last["micro_batch"]:
        return first[key] * micro_batch / first["micro_batch"]
    slope = (last[key] - first[key]) / (last["micro_batch"] - first["micro_batch"])
    return first[key] + slope * (micro_batch - first["micro_batch"])


def measure(micro_batch: int, chunk_size: int | None, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(micro_batch),
        str(chunk_size or 0),
        "--seq",
        str(args.seq),
        "--heads",
        str(args.heads),
        "--head-dim",
        str(args.head_dim),
    ]
    # A fixed mmap threshold makes glibc return every freed tensor to the OS at once (the default
    # dynamic threshold keeps freed blocks in the heap), so resident memory tracks live tensors.
    env = {
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "PATH": "/usr/bin:/bin",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=15)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--upper-layers", type=int, default=10)
    parser.add_argument("--project-micro-batch", type=int, default=16)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        b, chunk = args.child
        print(json.dumps(child(b, chunk or None, args.seq, args.heads, args.head_dim)))
        return
    gib = 2.0**30
    result = {
        "layer": {"seq": args.seq, "heads": args.heads, "head_dim": args.head_dim},
        "device": "cpu",
        "torch": torch.__version__,
        "modes": {},
    }
    for mode, chunk in (("full", None), ("chunked_recomputed", args.chunk_size)):
        rows = [measure(b, chunk, args) for b in args.micro_batches]
        mb, layers = args.project_micro_batch, args.upper_layers
        saved = _linear_at(rows, "saved_bytes", mb)
        transient = max(_linear_at(rows, "peak_bytes", mb) - saved, 0.0)
        projected = layers * saved + transient
        result["modes"][mode] = {
            "chunk_size": chunk,
            "measured": rows,
            "projection": {
                "micro_batch": mb,
                "upper_layers": layers,
                "saved_gib_per_layer": saved / gib,
                "transient_gib": transient / gib,
                "total_gib": projected / gib,
            },
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
