"""``torchrun --nproc-per-node N -m megatron_qk.train CONFIG [--set k=v ...]``: thin entry point."""

from __future__ import annotations

import os
import sys

from megatron_qk.cli import ArgumentParser
from megatron_qk.cli.train import configure_parser, run


def main(argv: list[str] | None = None) -> int:
    """Parse the train options and run them (same as ``megatron-qk train``)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun worker (its own session): it must not outlive a launcher that a second
        # Ctrl-C ended at once.
        from megatron_qk.training.child_processes import die_with_parent

        die_with_parent()
    parser = ArgumentParser(prog="python -m megatron_qk.train")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
