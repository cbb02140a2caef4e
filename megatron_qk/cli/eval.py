"""``megatron-qk eval``: score a checkpoint on the downstream suite with lm-evaluation-harness.

Example::

    megatron-qk eval --checkpoint runs/gpt270m-control-s1 \\
        --tasks piqa,hellaswag,arc_easy,arc_challenge,race,lambada,mmlu
    megatron-qk eval --checkpoint runs/tiny --tasks my_piqa --task-dir eval_tasks/ --out e.json

The report goes to ``--out`` (default ``RUN_DIR/eval.json``, or ``RUN_DIR/eval_iter_XXXXXXX.json``
for one checkpoint), where ``megatron-qk compare`` finds it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megatron_qk.config.errors import ConfigError
from megatron_qk.data.tokenizer import TokenizerError
from megatron_qk.evaluation.suite import (
    PAPER_SUITE,
    EvalError,
    default_output_path,
    evaluate_checkpoint,
    parse_task_list,
    set_offline_env,
)
from megatron_qk.rundir.atomic import write_json_atomic
from megatron_qk.rundir.cli_args import add_checkpoint_argument


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the eval options."""
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--tasks",
        default="paper",
        help="comma-separated lm-eval task or group names; 'paper' is the seven-task suite "
        f"({','.join(PAPER_SUITE)}; lambada = lambada_openai) (default: paper)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="report JSON (default: RUN_DIR/eval.json, or RUN_DIR/eval_iter_XXXXXXX.json when "
        "--checkpoint names one checkpoint)",
    )
    parser.add_argument(
        "--task-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of local task YAMLs (lm-eval include_path; repeatable). Local tasks "
        "shadow built-in ones; the Hugging Face hub is not contacted (HF_HUB_OFFLINE=1) unless "
        "--allow-downloads is given",
    )
    parser.add_argument(
        "--allow-downloads",
        action="store_true",
        help="with --task-dir, still let built-in tasks download their datasets",
    )
    parser.add_argument(
        "--trust-task-code",
        action="store_true",
        help="let --task-dir folders run Python (YAML '!function' tags, shipped .py files); "
        "refused by default because a task folder from someone else is code, not data",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA if any)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="forward precision: bf16 autocast on CUDA and fp32 on CPU by default",
    )
    parser.add_argument(
        "--tokenizer",
        default="gpt2",
        help="the --tokenizer spec the run's data was preprocessed with (gpt2, a .tiktoken file, "
        "NAME:FILE or tokenizer.json; see megatron-qk preprocess --help)",
    )
    parser.add_argument(
        "--num-fewshot", type=int, default=None, help="override the tasks' few-shot count"
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=None,
        help="documents per task (>= 1) or fraction (< 1), for smoke tests (kept in the report)",
    )
    parser.add_argument(
        "--bootstrap-iters",
        type=int,
        default=1000,
        help="bootstrap resamples for the perplexity stderr (acc stderrs are analytic)",
    )


def _limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    return int(value) if value >= 1 else value


def _print_table(report: dict) -> None:
    print(f"{'task':<16} {'acc':>8} {'acc_norm':>9} {'samples':>8}")
    for name, entry in report["tasks"].items():
        acc = entry.get("acc")
        norm = entry.get("acc_norm")
        print(
            f"{name:<16} {'-' if acc is None else f'{acc:.4f}':>8} "
            f"{'-' if norm is None else f'{norm:.4f}':>9} {entry['samples']:>8}"
        )
    if report["mean_acc"] is not None:
        print(f"{'mean acc':<16} {report['mean_acc']:>8.4f}")


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; returns 0 on success, 1 for a bad checkpoint/task, 2 for bad options."""
    # torch (seconds): imported here so that --help stays instant.
    from megatron_qk.training.safe_load import UnsafeCheckpointError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.task_dir and not args.allow_downloads:
        set_offline_env()  # before datasets / huggingface_hub (lm_eval's) are imported

    if args.batch_size < 1:
        print("eval: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit <= 0:
        print("eval: error: --limit must be positive", file=sys.stderr)
        return 2
    try:
        tasks = parse_task_list(args.tasks)
        report = evaluate_checkpoint(
            args.checkpoint,
            tasks,
            task_dirs=[Path(d) for d in args.task_dir],
            tokenizer=args.tokenizer,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            num_fewshot=args.num_fewshot,
            limit=_limit(args.limit),
            bootstrap_iters=args.bootstrap_iters,
            trust_task_code=args.trust_task_code,
        )
    except (FileNotFoundError, EvalError, TokenizerError, ConfigError, UnsafeCheckpointError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 1
    out = (
        Path(args.out)
        if args.out
        else default_output_path(
            args.checkpoint, Path(report["checkpoint"]), Path(report["run_dir"])
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    _print_table(report)
    print(f"eval: step {report['step']} of {report['run_dir']}; report written to {out}")
    return 0
