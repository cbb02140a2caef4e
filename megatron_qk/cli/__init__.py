"""The ``megatron-qk`` console script: one subcommand per user task.

Every subcommand lives in its own module that exposes ``configure_parser(parser)`` and
``run(args) -> int``. Modules are imported lazily, and a subcommand module imports nothing heavy
(torch, megatron-core: seconds and a screen of warnings) at its top, so every ``--help`` is
instant (``tests/test_cli_help.py`` checks ``sys.modules`` after each).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from megatron_qk import __version__
from megatron_qk.config.extras import MissingExtraError
from megatron_qk.training.noise import quiet_megatron_noise

# name -> (module path, one-line help). Plain text: the help is %-escaped where argparse needs it.
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
    "table": (
        "megatron_qk.cli.table",
        "train or link every run of a paper table, then print its tables (run_table.sh)",
    ),
    "sample": (
        "megatron_qk.cli.sample",
        "generate text from a checkpoint (greedy, or top-k / top-p sampling)",
    ),
    "readout": (
        "megatron_qk.cli.readout",
        "the paper's @3%/@20% readout columns, per-table views and Figure 2 from run directories",
    ),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse without prefix matching: ``--shard 0/3`` is an error, not ``--shard-size 0/3``.

    Sub-parsers (``add_subparsers``) are built from this class too, so every parser of the
    command line, nested ones included, refuses abbreviations.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def version_line() -> str:
    """``megatron-qk X (megatron-core Y, torch Z)`` from the installed metadata (imports none)."""
    parts = []
    for dist in ("megatron-core", "torch"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return f"megatron-qk {__version__} ({', '.join(parts)})"


class _VersionAction(argparse.Action):
    """``--version``: the line is computed only when asked for (it reads package metadata)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per subcommand.

    Args:
        only: configure only this subcommand's options; the others are listed with their help
            but their modules are not imported. None configures every subcommand (for tools
            that inspect the whole parser).
    """
    parser = ArgumentParser(
        prog="megatron-qk",
        description="Megatron-Core pretraining with upper-layer Q/K learning-rate timing.",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the versions of megatron-qk, megatron-core and torch, and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        # argparse %-formats a sub-command's help (not its description, which has no %(prog)).
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        p.set_defaults(_module=module)
        if only is None or name == only:
            importlib.import_module(module).configure_parser(p)
            if "--verbose" not in p._option_string_actions:  # train and sample define their own
                p.add_argument(
                    "--verbose",
                    action="store_true",
                    help="show Megatron-Core's start-up messages (default: %(default)s)",
                )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``megatron-qk`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    # Unknown or missing command: configure nothing, argparse reports the choices.
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    # Megatron-Core's known start-up noise (TE/Apex notices, config dumps) is filtered once, here,
    # before any subcommand imports it; --verbose keeps it.
    quiet_megatron_noise(verbose=getattr(args, "verbose", False))
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except MissingExtraError as exc:  # an optional package: its extra, not a traceback
        print(f"megatron-qk {args.command}: error: {exc}", file=sys.stderr)
        return 1
