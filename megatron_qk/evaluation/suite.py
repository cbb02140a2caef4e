"""The downstream suite: task resolution, tokenizer checks, the harness run and its report.

``megatron-qk eval`` (:mod:`megatron_qk.cli.eval`) calls :func:`evaluate_checkpoint`, which
restores a checkpoint, wraps it in :class:`~megatron_qk.evaluation.adapter.MegatronLM` and runs
``lm_eval.simple_evaluate``. The report it returns (and the CLI writes as JSON) is what
:mod:`megatron_qk.analysis.eval_table` reads.

Task names are lm-evaluation-harness task or group names, with one alias: ``lambada`` is the
paper's LAMBADA, i.e. ``lambada_openai`` (the harness's ``lambada`` is a tag that would also run
``lambada_standard``), unless a task directory defines a task named ``lambada`` itself.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_qk.config.extras import require
from megatron_qk.config.loader import load_resolved_config
from megatron_qk.data.data_summary import data_summary_paths
from megatron_qk.data.tokenizer import load_tokenizer
from megatron_qk.evaluation.task_trust import UntrustedTaskCodeError, check_task_dirs
from megatron_qk.rundir.layout import (
    CONFIG_FILE,
    EVAL_FILE,
    eval_file_name,
    is_checkpoint,
    resolve_checkpoint,
)

if TYPE_CHECKING:
    from megatron_qk.config.schema import ExperimentConfig
    from megatron_qk.data.tokenizer import TokenizerInfo

logger = logging.getLogger(__name__)

PAPER_SUITE = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "race", "lambada", "mmlu")
"""The paper's pre-specified seven-task suite (Table 2), in its row order."""

TASK_ALIASES = {"lambada": "lambada_openai"}
"""Requested name -> harness task, used when the requested name is not itself a task."""

REPORT_FORMAT = "megatron-qk-eval/1"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class EvalError(ValueError):
    """A user error in an evaluation request (unknown task, bad task directory, ...)."""


class TokenizerMismatchError(EvalError):
    """The run was trained with a tokenizer other than the one the adapter would use."""


@dataclass(frozen=True)
class ResolvedTask:
    """A requested task name and what the harness runs for it.

    Attributes:
        name: the name given on the command line (the report's key).
        harness_name: the lm-evaluation-harness task or group name.
        is_group: whether ``harness_name`` is a group (e.g. ``mmlu``) aggregated by the harness.
    """

    name: str
    harness_name: str
    is_group: bool


def parse_task_list(spec: str | list[str]) -> list[str]:
    """Split ``"a,b,c"`` (or a list of such strings) into names; ``paper`` is the suite.

    Raises:
        EvalError: when no task is named.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in parts:
        for name in (p.strip() for p in part.split(",")):
            expanded = PAPER_SUITE if name == "paper" else (name,) if name else ()
            names += [n for n in expanded if n not in names]
    if not names:
        raise EvalError("no task given (--tasks piqa,hellaswag,... or --tasks paper)")
    return names


def set_offline_env() -> None:
    """Keep the harness and ``datasets`` off the Hugging Face hub (unless the user chose).

    Takes effect for modules imported afterwards (``datasets`` reads these at import time).
    """
    for key in OFFLINE_ENV:
        os.environ.setdefault(key, "1")


# ---------------------------------------------------------------------------------- tokenizer
def _data_summary_paths(cfg: ExperimentConfig) -> list[Path]:
    """``P_summary.json`` files written by ``megatron-qk preprocess`` for the run's data."""
    return data_summary_paths(cfg)


def check_tokenizer(cfg: ExperimentConfig, tokenizer: TokenizerInfo, config_path: Path) -> None:
    """Refuse to score a model with a tokenizer it was not trained with.

    Checks the recipe's ``model.vocab_size`` against the tokenizer, and, for indexed data
    preprocessed by ``megatron-qk preprocess``, the tokenizer recorded in ``P_summary.json``.

    Raises:
        TokenizerMismatchError: naming the config key or summary file that disagrees.
    """
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise TokenizerMismatchError(
            f"{config_path}: model.vocab_size is {cfg.model.vocab_size}, but the evaluation "
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids; this run was trained "
            "with another tokenizer (give its rank file with --tokenizer FILE)"
        )
    for path in _data_summary_paths(cfg):
        if not path.exists():
            continue
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("tokenizer") or {}
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"cannot read the data summary {path}: {e}") from e
        digest = recorded.get("sha256")
        if digest and digest != tokenizer.ranks_sha256:
            raise TokenizerMismatchError(
                f"{path}: the training data was tokenised with {recorded.get('source')} "
                f"(sha256 {digest}), not with the evaluation tokenizer {tokenizer.source} "
                f"(sha256 {tokenizer.ranks_sha256}); give its rank file with --tokenizer FILE"
            )


# ---------------------------------------------------------------------------------- tasks
def _task_manager(task_dirs: list[Path], include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    include = [str(d) for d in task_dirs] or None
    return TaskManager(include_path=include, include_defaults=include_defaults)


def _resolve_in(index: dict, name: str) -> tuple[str, Any] | None:
    """``(harness name, entry)`` for ``name`` in a task index, or ``None``."""
    from lm_eval.tasks._index import Kind

    entry = index.get(name)
    alias = TASK_ALIASES.get(name)
    if entry is not None and not (alias and entry.kind == Kind.TAG and alias in index):
        return name, entry
    if alias and alias in index:
        return alias, index[alias]
    return None


def resolve_tasks(
    names: list[str], task_dirs: list[Path] | None = None, trust_task_code: bool = False
) -> tuple[Any, list[ResolvedTask]]:
    """Map requested names to harness tasks.

    Task directories are searched first (indexing them is instant); the harness's built-in tasks
    (about 15,000 YAML files, ~10 s to index) are indexed only when a name is not found locally.
    A local task shadows a built-in one of the same name.

    Returns:
        ``(task_manager, [ResolvedTask, ...])``.

    Raises:
        EvalError: for a missing task directory, a task directory holding code while
            ``trust_task_code`` is False, or an unknown task name (with suggestions).
    """
    Kind = require("lm_eval.tasks._index", "megatron-qk eval").Kind

    task_dirs = [Path(d) for d in task_dirs or []]
    for d in task_dirs:
        if not d.is_dir():
            raise EvalError(f"--task-dir {d} is not a directory")
    try:
        check_task_dirs(task_dirs, trust_task_code)  # before the harness reads any of them
    except UntrustedTaskCodeError as e:
        raise EvalError(str(e)) from e
    manager = None
    if task_dirs:
        manager = _task_manager(task_dirs, include_defaults=False)
        if any(_resolve_in(manager.task_index, n) is None for n in names):
            manager = None
    if manager is None:
        manager = _task_manager(task_dirs, include_defaults=True)
    resolved = []
    for name in names:
        hit = _resolve_in(manager.task_index, name)
        if hit is None:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" or in {', '.join(map(str, task_dirs))}" if task_dirs else ""
            raise EvalError(f"unknown task {name!r}: not an lm-eval task{where}{hint}")
        harness_name, entry = hit
        if entry.kind == Kind.TAG:  # a tag names loose tasks: score each of them
            members = sorted(
                k for k, e in manager.task_index.items() if e.kind != Kind.TAG and name in e.tags
            )
            found = [ResolvedTask(m, m, manager.task_index[m].kind == Kind.GROUP) for m in members]
        else:
            found = [ResolvedTask(name, harness_name, entry.kind == Kind.GROUP)]
        for task in found:
            if any(task.harness_name == r.harness_name for r in resolved):
                logger.warning(
                    "%s (%s) is requested twice; scoring it once", name, task.harness_name
                )
            else:
                resolved.append(task)
    return manager, resolved


def load_tasks(manager: Any, resolved: list[ResolvedTask]) -> list:
    """Build the harness's Task/Group objects (this loads the datasets).

    Raises:
        EvalError: when a dataset cannot be loaded (e.g. offline without local files) or a task
            needs text generation.
    """
    from lm_eval.api.group import Group

    objects = []
    for task in resolved:
        try:
            loaded = manager.load([task.harness_name])
        except Exception as e:  # datasets/hub errors have no common base class
            raise EvalError(
                f"task {task.name!r} ({task.harness_name}): cannot load it: "
                f"{type(e).__name__}: {e}. Without hub access, prepare the data as a local task "
                "and pass --task-dir (README: 'Downstream evaluation')"
            ) from e
        generative = sorted(
            name
            for name, obj in loaded["tasks"].items()
            if obj.get_config("output_type") == "generate_until"
        )
        if generative:
            raise EvalError(
                f"task {task.name!r} needs text generation ({', '.join(generative)}: output_type "
                "generate_until); megatron-qk eval scores log-likelihood tasks only"
            )
        groups = loaded.get("groups") or {}
        obj = groups[task.harness_name] if task.is_group else loaded["tasks"][task.harness_name]
        if task.is_group and not isinstance(obj, Group):
            raise EvalError(f"{task.harness_name} was indexed as a group but loaded as a task")
        objects.append(obj)
    return objects


# ---------------------------------------------------------------------------------- report
def _leaf_tasks(results: dict, name: str) -> list[str]:
    children = results.get("group_subtasks", {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaf_tasks(results, child)]


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def summarize_results(results: dict, resolved: list[ResolvedTask]) -> dict[str, dict]:
    """Per requested task: metrics (filter ``none``), sample counts, few-shot and version.

    Metrics keep the harness's names: ``acc``, ``acc_norm`` (where the task defines it),
    ``perplexity``, and their ``*_stderr``. ``samples`` counts the documents scored
    (after ``--limit``), ``samples_total`` the documents in the split; for a group both are
    summed over its leaf tasks.
    """
    out: dict[str, dict] = {}
    for task in resolved:
        metrics = results["results"].get(task.harness_name)
        if metrics is None:
            raise EvalError(f"the harness returned no results for {task.harness_name}")
        entry: dict[str, Any] = {"harness_task": task.harness_name, "group": task.is_group}
        for key, value in sorted(metrics.items()):
            metric, _, filter_name = key.partition(",")
            if filter_name == "none":
                entry[metric] = _number(value)
        leaves = _leaf_tasks(results, task.harness_name)
        counts = [results.get("n-samples", {}).get(leaf) or {} for leaf in leaves]
        entry["samples"] = sum(int(c.get("effective", 0)) for c in counts)
        entry["samples_total"] = sum(int(c.get("original", 0)) for c in counts)
        if task.is_group:
            entry["subtasks"] = len(leaves)
        entry["num_fewshot"] = results.get("n-shot", {}).get(task.harness_name)
        entry["version"] = results.get("versions", {}).get(task.harness_name)
        out[task.name] = entry
    return out


def default_output_path(checkpoint_arg: str | Path, checkpoint_dir: Path, run_dir: Path) -> Path:
    """Where ``eval`` writes without ``--out``.

    ``RUN_DIR/eval.json`` when ``--checkpoint`` names the run (or its ``checkpoints/``), i.e. the
    newest checkpoint; ``RUN_DIR/eval_iter_XXXXXXX.json`` when it names one checkpoint.
    """
    if is_checkpoint(Path(checkpoint_arg)):
        return run_dir / eval_file_name(checkpoint_dir)
    return run_dir / EVAL_FILE


def evaluate_checkpoint(
    checkpoint: str | Path,
    tasks: list[str],
    *,
    task_dirs: list[Path] | None = None,
    tokenizer: str = "gpt2",
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 16,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    bootstrap_iters: int = 1000,
    trust_task_code: bool = False,
) -> dict[str, Any]:
    """Score a checkpoint on downstream tasks with lm-evaluation-harness.

    Args:
        checkpoint: a run directory, its ``checkpoints/`` directory or one ``iter_*`` directory.
        tasks: requested task names (see :func:`parse_task_list`).
        task_dirs: directories of local task YAMLs (the harness's ``include_path``).
        tokenizer: ``gpt2`` or a ``.tiktoken`` rank file (must match the run's).
        device: ``cuda``, ``cpu``, ... (default: CUDA when available).
        dtype: ``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 on CUDA, fp32 otherwise).
        batch_size: sequences per forward pass.
        num_fewshot: override the tasks' few-shot count.
        limit: documents per task (an int) or a fraction; for smoke tests only.
        bootstrap_iters: bootstrap resamples for stderrs of non-mean metrics (perplexity).
        trust_task_code: let task folders run their ``!function`` code and Python files.

    Returns:
        The report (see the README's "Downstream evaluation").

    Raises:
        FileNotFoundError: the checkpoint or its run's ``config.yaml`` is missing.
        TokenizerMismatchError: the run was trained with another tokenizer.
        EvalError: unknown task, unloadable dataset, generation task.
    """
    lm_eval = require("lm_eval", "megatron-qk eval")  # first: a missing harness says so at once
    import torch

    # Lazy with torch and lm_eval: compare reads this module's report format without torch.
    from megatron_qk.evaluation.adapter import MegatronLM
    from megatron_qk.training.restore import load_checkpoint_for_analysis

    start = time.time()
    if dtype not in ("auto", "fp32", "bf16"):
        raise EvalError(f"dtype must be auto, fp32 or bf16, got {dtype!r}")
    ckpt, run_dir = resolve_checkpoint(checkpoint)
    cfg = load_resolved_config(run_dir / CONFIG_FILE)
    tok = load_tokenizer(tokenizer)
    check_tokenizer(cfg, tok, run_dir / CONFIG_FILE)
    manager, resolved = resolve_tasks(tasks, task_dirs, trust_task_code)
    task_objects = load_tasks(manager, resolved)

    torch_device = torch.device(device) if device else None
    loaded = load_checkpoint_for_analysis(ckpt, device=torch_device)
    use_bf16 = dtype == "bf16" or (dtype == "auto" and loaded.device.type == "cuda")
    lm = MegatronLM.from_checkpoint(
        loaded,
        batch_size=batch_size,
        encoding=tok.encoding,
        autocast_dtype=torch.bfloat16 if use_bf16 else None,
    )
    logger.info("scoring %s (step %d) on %s", ckpt, loaded.step, [t.name for t in resolved])
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_objects,
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )
    per_task = summarize_results(results, resolved)
    accs = [t["acc"] for t in per_task.values() if t.get("acc") is not None]
    return {
        "format": REPORT_FORMAT,
        "checkpoint": str(loaded.checkpoint.resolve()),
        "run_dir": str(loaded.run_dir.resolve()),
        "step": loaded.step,
        "name": cfg.name,
        "arm": cfg.arm,
        "seed": cfg.training.seed,
        "harness": {"name": "lm-eval", "version": lm_eval.__version__},
        "tokenizer": {"source": tok.source, "sha256": tok.ranks_sha256, "vocab": tok.vocab_size},
        "settings": {
            "tasks": list(tasks),
            "task_dirs": [str(Path(d).resolve()) for d in task_dirs or []],
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "device": str(loaded.device),
            "dtype": "bf16" if use_bf16 else "fp32",
            "max_length": lm.max_length,
        },
        "tasks": per_task,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "seconds": round(time.time() - start, 3),
    }
