"""Fail the image build if pip replaced NGC's torch or Transformer Engine (image build step).

    python docker/check_ngc_stack.py record stack.json      # before installing anything
    python docker/check_ngc_stack.py verify stack.json --te-range ">=2.9.0a0,<2.12"

``record`` stores the installed versions and locations of the protected distributions; ``verify``
fails (exit 1) when any of them changed, disappeared or appeared, or when Transformer Engine lies
outside the range megatron-core supports.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path

PROTECTED = ("torch", "transformer-engine", "transformer-engine-torch", "transformer-engine-cu12")


def installed_stack() -> dict[str, dict[str, str]]:
    """Version and install location of each protected distribution that is installed."""
    stack = {}
    for name in PROTECTED:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        stack[name] = {"version": dist.version, "location": str(dist.locate_file(""))}
    return stack


def stack_changes(before: dict, after: dict) -> list[str]:
    """Human-readable differences between two :func:`installed_stack` results."""
    changes = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            changes.append(f"{name}: {before.get(name)} -> {after.get(name)}")
    return changes


def te_version_problem(stack: dict, te_range: str) -> str | None:
    """Why the installed Transformer Engine does not satisfy ``te_range`` (None when it does)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # an image without packaging still has pip's vendored copy
        from pip._vendor.packaging.specifiers import SpecifierSet
        from pip._vendor.packaging.version import Version

    te = stack.get("transformer-engine") or stack.get("transformer-engine-torch")
    if te is None:
        return "Transformer Engine is not installed"
    if not SpecifierSet(te_range).contains(Version(te["version"]), prereleases=True):
        return f"Transformer Engine {te['version']} is outside {te_range}"
    return None


def main(argv: list[str] | None = None) -> int:
    """``record`` or ``verify``; exit 1 on a replaced or out-of-range stack."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "verify"))
    parser.add_argument("path")
    parser.add_argument("--te-range", default=None)
    args = parser.parse_args(argv)
    now = installed_stack()
    if args.action == "record":
        Path(args.path).write_text(json.dumps(now, indent=2) + "\n", encoding="utf-8")
        print(f"check_ngc_stack: recorded {json.dumps(now)}")
        return 0
    before = json.loads(Path(args.path).read_text(encoding="utf-8"))
    problems = stack_changes(before, now)
    if problems:
        print("check_ngc_stack: pip replaced NGC's stack: " + "; ".join(problems), file=sys.stderr)
        return 1
    if args.te_range:
        problem = te_version_problem(now, args.te_range)
        if problem:
            print(f"check_ngc_stack: {problem}", file=sys.stderr)
            return 1
    print(f"check_ngc_stack: unchanged {json.dumps(now)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
