"""``torchrun --nproc-per-node N -m megatron_qk.train CONFIG [--set k=v ...]``: thin entry point."""

from __future__ import annotations

import sys

from megatron_qk.cli import ArgumentParser
from megatron_qk.cli.train import configure_parser, run


def main(argv: list[str] | None = None) -> int:
    """Parse the train options and run them (same as ``megatron-qk train``)."""
    parser = ArgumentParser(prog="python -m megatron_qk.train")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
