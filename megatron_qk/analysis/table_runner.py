"""Running one paper table: every arm and seed, each training once, then the table's analysis
(``megatron-qk table``, what ``examples/launch/run_table.sh`` runs).

Run directories are ``RUNS_DIR/<table>/<group>/<arm>-s<seed>``. Per run:

* finished (or stopped on purpose by ``training.stop_at_frac``): skipped;
* absent, and a finished run with the same identity exists (``RUNS_DIR/.by_config/<key>``, see
  :mod:`megatron_qk.analysis.table_plan`): linked to it, not retrained. The identity leaves out
  labels, so Table 9's ``adaptive`` is Table 1's ``intervention`` seed 1; ``separate=True``
  (``SEPARATE_RUNS=1``) trains a relabelled arm as a run of its own;
* otherwise trained (or resumed): through ``train.sh`` (torchrun), or in this process in smoke
  mode.

Then the table's analysis: the commands of its ``analysis`` file (one ``megatron-qk`` command per
line; ``{runs}`` is the table's run directory, ``{runs_dir}`` RUNS_DIR, and a line with
``{group}`` runs once per group directory), or ``compare`` of each group without that file. A
command that cannot produce its table fails the runner (exit 2, with the command's reason).

Smoke mode (``SMOKE=1``) trains every run in this process with the model shrunk to a tiny shape
and few steps (:data:`SMOKE_OVERRIDES`) and keeps every other setting: rules, the entropy floor,
fixed releases, multipliers, ``stop_at_frac`` and the evaluation grid. Data is synthetic. The
downstream evaluation (Table 1's ``eval_tasks``, giving Table 2) runs through the same
``megatron-qk eval`` command, offline, with a character tokenizer of the smoke vocabulary and
local stand-ins of the paper's tasks (:mod:`megatron_qk.analysis.smoke_tasks`, written once under
``RUNS_DIR/.smoke_eval``): it checks the plumbing, not the tasks.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from megatron_qk.analysis.smoke_tasks import SMOKE_VOCAB, prepare_smoke_eval
from megatron_qk.analysis.table_plan import plan_run, table_recipes, table_seeds
from megatron_qk.config.loader import load_config
from megatron_qk.evaluation.suite import PAPER_SUITE, parse_task_list
from megatron_qk.rundir.config_hash import run_state

LAUNCH = Path(__file__).resolve().parents[2] / "examples" / "launch"
DONE = ("finished", "stopped")
# The tiny shape of smoke mode: 2 layers (one lower, one upper), width 32, 2 heads, 32 tokens,
# 20 steps of 4 sequences, synthetic data, one validation batch, 2 probe sequences, a vocabulary of
# 128 ids (the character tokenizer of the smoke evaluation: smoke_tasks). The FFN width
# keeps its ratio to the width (smoke_overrides), so Table 5's FFN widths stay distinct.
SMOKE_WIDTH = 32
SMOKE_OVERRIDES = (
    "model.num_layers=2",
    f"model.hidden_size={SMOKE_WIDTH}",
    "model.num_attention_heads=2",
    "model.seq_length=32",
    f"model.vocab_size={SMOKE_VOCAB}",  # the ids of the smoke evaluation's tokenizer
    "data.kind=synthetic",
    "data.synthetic_vocab=64",
    "training.train_tokens=null",
    "training.train_steps=20",
    "training.global_batch_size=4",
    "training.micro_batch_size=2",
    "training.eval_iters=1",
    "training.save_interval=0",
    "training.precision=fp32",
    "parallel.use_distributed_optimizer=false",
    "parallel.overlap_grad_reduce=false",
    "diagnostics.num_sequences=2",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
)


def smoke_overrides(recipe: Path) -> list[str]:
    """:data:`SMOKE_OVERRIDES` plus the recipe's FFN width scaled with the width to 32."""
    model = load_config(str(recipe), []).model
    ffn = max(8, round(model.ffn_hidden_size * SMOKE_WIDTH / model.hidden_size))
    return [*SMOKE_OVERRIDES, f"model.ffn_hidden_size={ffn}"]


class TableError(RuntimeError):
    """The table cannot be produced (the message says which run or command and why)."""


def _say(text: str) -> None:
    print(f"run_table: {text}", flush=True)


def _train_subprocess(recipe: Path, seed: int, out: Path, overrides: list[str]) -> None:
    env = dict(os.environ, CONFIG=str(recipe), SEED=str(seed), OUTPUT_DIR=str(out))
    env.pop("DRY_RUN", None)
    proc = subprocess.run(["bash", str(LAUNCH / "train.sh"), *overrides], env=env, check=False)
    if proc.returncode != 0:
        raise TableError(f"training {out} failed (exit {proc.returncode})")


def _train_in_process(recipe: Path, seed: int, out: Path, overrides: list[str]) -> None:
    # Imported here: training imports megatron.core and torch, which planning and the dry run
    # never need; smoke mode imports them once for every run of every table.
    from megatron_qk.training.entry import train_from_config

    cfg = load_config(
        str(recipe), [f"training.seed={seed}", f"training.output_dir={out}", *overrides]
    )
    train_from_config(cfg)


def train_runs(
    table_dir: Path,
    runs_dir: Path,
    run_command: Callable[[list[str]], None],
    seeds: str | None = None,
    overrides: list[str] | None = None,
    separate: bool = False,
    smoke: bool = False,
    dry_run: bool = False,
) -> list[Path]:
    """Train, link or skip every run of a table; return its group directories (in order).

    Raises:
        TableError: when a training fails.
    """
    extra = list(overrides or [])
    groups: list[Path] = []
    for group, arm, recipe in table_recipes(table_dir):
        overrides = [*(smoke_overrides(recipe) if smoke else ()), *extra]
        group_dir = Path(os.path.normpath(runs_dir / table_dir.name / group))
        if group_dir not in groups:
            groups.append(group_dir)
        for seed in table_seeds(table_dir, seeds):
            out = group_dir / f"{arm}-s{seed}"
            key = plan_run(recipe, seed, overrides, separate)[0]
            index = runs_dir / ".by_config" / key
            source = Path(index.read_text(encoding="utf-8").strip()) if index.is_file() else None
            if dry_run:
                if source is not None and source != out:
                    _say(f"would reuse {source} -> {out} (identical resolved config {key})")
                else:
                    _say(f"would train -> {out}")
                continue
            state = run_state(out)
            linked = False
            if state in DONE:
                _say(f"{out} {state}, skipping")
            elif (
                state == "absent"
                and source is not None
                and source != out
                and run_state(source) in DONE
            ):
                out.parent.mkdir(parents=True, exist_ok=True)
                out.symlink_to(source.resolve())
                linked = True
                _say(f"reusing {source} for {out} (identical resolved config, key {key})")
            else:
                (_train_in_process if smoke else _train_subprocess)(recipe, seed, out, overrides)
            if not linked and not out.is_symlink() and source is None and run_state(out) in DONE:
                index.parent.mkdir(parents=True, exist_ok=True)
                index.write_text(f"{out}\n", encoding="utf-8")
            tasks = table_dir / "eval_tasks"
            if tasks.is_file() and os.environ.get("EVAL", "1") == "1":
                if not (out / "eval.json").exists() and run_state(out) == "finished":
                    names = "".join(tasks.read_text(encoding="utf-8").split())
                    argv = ["eval", "--checkpoint", str(out), "--tasks", names]
                    run_command([*argv, *(smoke_eval_options(tasks, runs_dir) if smoke else ())])
    return groups


def smoke_eval_options(tasks: Path, runs_dir: Path) -> list[str]:
    """The ``megatron-qk eval`` options of smoke mode: the stand-in tokenizer and tasks.

    Args:
        tasks: the table's ``eval_tasks`` file.
        runs_dir: where the stand-ins are written (``RUNS_DIR/.smoke_eval``).

    Raises:
        TableError: when ``eval_tasks`` names a task without a stand-in (it would need the
            network).
    """
    names = parse_task_list("".join(tasks.read_text(encoding="utf-8").split()))
    missing = [n for n in names if n not in PAPER_SUITE]
    if missing:
        raise TableError(
            f"{tasks}: smoke mode has stand-ins for the paper's suite only "
            f"({', '.join(PAPER_SUITE)}), not for {', '.join(missing)}"
        )
    return prepare_smoke_eval(runs_dir)


def analysis_commands(table_dir: Path, runs_dir: Path, groups: list[Path]) -> list[list[str]]:
    """The table's analysis commands (``megatron-qk`` argument lists), placeholders filled."""
    table_runs = runs_dir / table_dir.name
    spec = table_dir / "analysis"
    if spec.is_file():
        lines = [ln.strip() for ln in spec.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
    else:
        lines = ["compare {group} --json {group}/compare.json"]
    out = []
    for line in lines:
        for group in groups if "{group}" in line else [None]:
            text = line.format(runs=table_runs, runs_dir=runs_dir, group=group)
            out.append(text.split())
    return out


def run_cli_command(main: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run one ``megatron-qk`` command through ``main`` in this process; raise when it fails.

    Raises:
        TableError: naming the command and its exit status (its own error is printed above).
    """
    print(f"== megatron-qk {' '.join(argv)}", flush=True)
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
    if rc:
        raise TableError(f"`megatron-qk {' '.join(argv)}` failed (exit {rc}): see its error above")


def run_table(
    table_dir: Path, runs_dir: Path, run_command: Callable[[list[str]], None], **options
) -> list[list[str]]:
    """Train the table (see :func:`train_runs`) and run its analysis; return the commands run.

    Args:
        table_dir: the table's recipe directory.
        runs_dir: where run directories go.
        run_command: runs one ``megatron-qk`` command (argument list), raising
            :class:`TableError` when it fails (``megatron-qk table`` passes the CLI's own).
        options: of :func:`train_runs`.

    Raises:
        TableError: when a training or an analysis command fails.
    """
    groups = train_runs(table_dir, runs_dir, run_command, **options)
    if options.get("dry_run"):
        return []
    commands = analysis_commands(table_dir, runs_dir, groups)
    for argv in commands:
        run_command(argv)
    return commands
