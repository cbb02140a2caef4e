"""Copy NGC's pip constraint file, dropping only the named conflicting lines (image build step).

NGC images pin their torch, Transformer Engine, apex and CUDA stack through ``PIP_CONSTRAINT``.
Installing megatron-qk under those pins keeps pip from replacing the NGC builds. Where a pin
conflicts with a requirement of megatron-core or megatron-qk, name the package in
``--relax``: only its line is dropped, and the stack that must never change cannot be named.

    python docker/relax_constraints.py --relax "pkg-a pkg-b" --out /etc/pip/mqk-constraint.txt
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

# The NGC builds pip must never replace: relaxing their pins is refused.
PROTECTED = frozenset(
    {
        "torch",
        "transformer-engine",
        "transformer-engine-torch",
        "transformer-engine-cu12",
        "apex",
        "nvidia-cudnn-cu12",
        "nvidia-nccl-cu12",
        "triton",
    }  # fmt: skip
)


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    """The project a constraint line pins (None for comments, blank lines and options)."""
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("-"):
        return None
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", text)
    return canonical(match.group(0)) if match else None


def relax(lines: list[str], names: set[str]) -> tuple[list[str], set[str]]:
    """Drop the lines pinning ``names``; returns the kept lines and the names actually dropped."""
    kept, dropped = [], set()
    for line in lines:
        name = requirement_name(line)
        if name is not None and name in names:
            dropped.add(name)
            continue
        kept.append(line)
    return kept, dropped


def main(argv: list[str] | None = None) -> int:
    """Write the relaxed constraint file; exit 2 on a protected or unknown name."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=os.environ.get("PIP_CONSTRAINT", ""))
    parser.add_argument("--relax", default="", help="space-separated project names to unpin")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not args.source or not Path(args.source).is_file():
        print(
            f"relax_constraints: no constraint file ({args.source!r}); this base image does not "
            "pin its stack through PIP_CONSTRAINT, so pip could replace torch/TE",
            file=sys.stderr,
        )
        return 2
    names = {canonical(n) for n in args.relax.split()}
    protected = sorted(names & PROTECTED)
    if protected:
        print(f"relax_constraints: {protected} must keep NGC's pin", file=sys.stderr)
        return 2
    lines = Path(args.source).read_text(encoding="utf-8").splitlines(keepends=True)
    kept, dropped = relax(lines, names)
    missing = sorted(names - dropped)
    if missing:
        print(f"relax_constraints: {missing} not pinned in {args.source}", file=sys.stderr)
        return 2
    Path(args.out).write_text("".join(kept), encoding="utf-8")
    print(f"relax_constraints: kept {len(kept)} lines of {args.source}; relaxed {sorted(dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
