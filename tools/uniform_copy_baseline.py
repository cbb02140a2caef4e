"""The lower-copy score of uniform causal attention on a dataset, per sequence length.

    python tools/uniform_copy_baseline.py PREFIX [--lengths 128 256 512 1024] [--threshold 0.005]

PREFIX is a Megatron indexed dataset (PREFIX.bin/.idx, e.g. from ``megatron-qk preprocess``).
The tokens are cut into contiguous windows of each length; the baseline is the mean of
``1/(i+1)`` over the positions ``i`` whose token occurred earlier in the window (the positions
the lower-copy score counts), and ``threshold / baseline`` is the ``threshold_ratio`` an absolute
threshold corresponds to at that length. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def baselines(tokens: np.ndarray, lengths: list[int], threshold: float) -> dict:
    """``{length: {sequences, positions, uniform, threshold_over_uniform}}``."""
    from megatron_qk.diagnostics.probes import uniform_copy_sum

    out = {}
    for seq in lengths:
        n = tokens.size // seq
        if n == 0:
            raise ValueError(f"{tokens.size} tokens are fewer than one window of {seq}")
        windows = torch.from_numpy(tokens[: n * seq].astype(np.int64).reshape(n, seq))
        total, count = uniform_copy_sum(windows)
        uniform = total / count if count else float("nan")
        out[seq] = {
            "sequences": n,
            "positions": count,
            "uniform": uniform,
            "threshold_over_uniform": threshold / uniform,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", help="indexed dataset prefix (PREFIX.bin / PREFIX.idx)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--threshold", type=float, default=0.005, help="absolute threshold")
    args = parser.parse_args(argv)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        dataset = IndexedDataset(args.prefix)
    except (FileNotFoundError, OSError) as exc:
        print(f"uniform_copy_baseline: cannot read {args.prefix}: {exc}", file=sys.stderr)
        return 2
    tokens = np.concatenate([dataset[i] for i in range(len(dataset))])
    result = {"prefix": args.prefix, "tokens": int(tokens.size)}
    result.update(baselines(tokens, args.lengths, args.threshold))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
