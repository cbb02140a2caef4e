"""The ``megatron-qk`` console script: one subcommand per user task.

Every subcommand lives in its own module that exposes ``configure_parser(parser)`` and
``run(args) -> int``. Modules are imported lazily so ``megatron-qk --help`` stays fast (importing
megatron-core takes several seconds).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module path, one-line help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megatron_qk.cli.train", "train a model from a YAML recipe"),
    "preprocess": (
        "megatron_qk.cli.preprocess",
        "tokenize text (FineWeb-Edu, parquet, jsonl) into Megatron indexed datasets",
    ),
    "merge-datasets": (
        "megatron_qk.cli.merge_datasets",
        "join the outputs of preprocess --shard I/N into one indexed dataset",
    ),
    "tokenizer": (
        "megatron_qk.cli.tokenizer",
        "obtain and verify the GPT-2 BPE ranks for offline use",
    ),
    "quickstart": ("megatron_qk.cli.quickstart", "the embedded default job, offline on CPU"),
    "diagnose": (
        "megatron_qk.cli.diagnose",
        "mechanism probes, upper Q/K ablation and locality diagnostic on a checkpoint",
    ),
    "plot": ("megatron_qk.cli.plot", "Figure-3-style mechanism panels as PNG"),
    "compare": ("megatron_qk.cli.compare", "paired-seed comparison table of runs"),
    "replay-release": (
        "megatron_qk.cli.replay_release",
        "replay the maturity release rule on a run's logged lower-copy scores",
    ),
    "theory": ("megatron_qk.cli.theory", "evaluate the paper's theory quantities"),
    "eval": ("megatron_qk.cli.eval", "downstream task suite with lm-evaluation-harness"),
    "export": (
        "megatron_qk.cli.export",
        "write a checkpoint as a transformers model or a stock Megatron-Core checkpoint",
    ),
    "readout": (
        "megatron_qk.cli.readout",
        "the paper's @3%%/@20%% readout columns, per-table views and Figure 2 from run directories",
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per subcommand.

    Args:
        only: configure only this subcommand's options; the others are listed with their help
            but their modules (some import megatron-core, seconds) are not imported. None
            configures every subcommand (for tools that inspect the whole parser).
    """
    parser = argparse.ArgumentParser(
        prog="megatron-qk",
        description="Megatron-Core pretraining with upper-layer Q/K learning-rate timing.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if only is None or name == only:
            importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``megatron-qk`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    # Unknown or missing command: configure nothing, argparse reports the choices.
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)
