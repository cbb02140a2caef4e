"""``megatron-qk train``: validate a recipe, then train in-process or under torchrun.

``megatron-qk train CONFIG --nproc-per-node N`` validates the recipe for N processes and then
execs ``torchrun --nproc-per-node N -m megatron_qk.train CONFIG ...``; with N = 1 (the default)
it trains in this process. ``--dry-run`` runs the preflight checks, builds the model, reports
parameter counts and exits.

Exit codes: 0 done (or stopped by ``training.exit_after_steps``); 2 recipe, preflight or run
directory refusal (nothing trained, nothing changed); 3 non-finite loss (the last checkpoint is
intact); 4 a checkpoint could not be written (e.g. disk full; the previous one is intact);
75 preempted by SIGTERM/SIGUSR1 after saving a checkpoint (rerun to resume); 130 stopped by
Ctrl-C (the first one finishes the step and saves a checkpoint, a second one stops at once).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from megatron_qk.cli.train_help import data_hint, presets_epilog
from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import config_to_dict, dump_config, load_config
from megatron_qk.rundir.lock import RunDirBusyError
from megatron_qk.training.noise import quiet_megatron_noise

# The shell's code for SIGINT (megatron_qk.training.preemption imports torch: not for --help).
INTERRUPTED_EXIT_CODE = 130


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the train options (shared with ``python -m megatron_qk.train``)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the preset lines
    parser.epilog = presets_epilog()
    parser.add_argument("config", help="recipe YAML path or preset name (listed below)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe keys, e.g. --set optim.lr=1e-3 training.seed=2 (repeatable)",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="processes on this node; >1 launches torchrun (default 1)",
    )
    parser.add_argument("--nnodes", type=int, default=1, help="nodes (passed to torchrun)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="preflight the recipe (layers, data files, output directory, logging packages), "
        "build the model, print parameter counts, do not train",
    )
    parser.add_argument(
        "--no-data-check",
        action="store_true",
        help="with --dry-run: do not check the data files (planning a run before its data "
        "exists); a real run always checks them",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="show the resolved recipe (base, --set and every default applied): alone, print it "
        "as YAML and exit without training; with --dry-run, under 'config' in its JSON report",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir holding an earlier run: that run is moved, intact, to "
        "OUTPUT_DIR.prev-<timestamp> (without it such a start is refused)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Megatron-Core's start-up messages (TE/Apex fallbacks, DDP bucket lists, "
        "config dumps), hidden by default",
    )


def _launch_torchrun(args: argparse.Namespace) -> int:
    cmd = [
        "--nproc-per-node",
        str(args.nproc_per_node),
        "--nnodes",
        str(args.nnodes),
    ]
    if args.nnodes == 1:
        cmd.append("--standalone")
    cmd += ["-m", "megatron_qk.train", args.config]
    for item in args.overrides:
        cmd += ["--set", item]
    if args.overwrite:
        cmd.append("--overwrite")
    if args.verbose:
        cmd.append("--verbose")
    # These import torch and megatron-core (seconds): the launcher only starts the workers.
    from megatron_qk.models.speed import set_cuda_device_max_connections
    from megatron_qk.training.torchrun import run_torchrun

    set_cuda_device_max_connections()  # inherited by every worker

    return run_torchrun(cmd)


def run(args: argparse.Namespace) -> int:
    """Validate, then train (or dry-run) in-process or via torchrun."""
    try:
        return _run(args)
    except KeyboardInterrupt:
        # A Ctrl-C before the training's own handler is installed (imports, preflight, model
        # build) or after it is gone: nothing of this run is lost that a checkpoint would keep.
        print(
            "\nmegatron-qk train: interrupted before the first step or after the last save; "
            "nothing needed saving",
            file=sys.stderr,
        )
        return INTERRUPTED_EXIT_CODE


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Before megatron-core is imported: some of its warnings are issued at import.
    quiet_megatron_noise(verbose=args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
        if "WORLD_SIZE" not in os.environ:
            cfg.validate_world(args.nproc_per_node * args.nnodes)
    except ConfigError as exc:
        print(f"megatron-qk train: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config and not args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    world = args.nproc_per_node * args.nnodes
    if not args.dry_run and "WORLD_SIZE" not in os.environ and world > 1:
        return _launch_torchrun(args)
    # These import torch and megatron-core (seconds): not for --help or a torchrun launcher.
    from megatron_qk.training.entry import dry_run, train_from_config
    from megatron_qk.training.preflight import preflight

    try:
        if args.dry_run:
            preflight(
                cfg,
                world,
                overwrite=args.overwrite,
                probe_lock=True,
                check_device=False,
                check_data=not args.no_data_check,
            )
            # The layout was validated for the requested world size above; the count itself is
            # layout-independent and is taken in this one process.
            report = dry_run(cfg)
            if args.print_config:
                report["config"] = config_to_dict(cfg)
            print(json.dumps(report, indent=2))
            return 0
        summary = train_from_config(cfg, overwrite=args.overwrite)
    except ConfigError as exc:
        print(f"megatron-qk train: config error: {exc}", file=sys.stderr)
        hint = data_hint(exc, args.dry_run)
        if hint:
            print(f"megatron-qk train: {hint}", file=sys.stderr)
        return 2
    except RunDirBusyError as exc:
        print(f"megatron-qk train: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0
