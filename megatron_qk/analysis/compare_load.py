"""Finding, reading and validating the runs of a paired comparison (``megatron-qk compare``).

A run directory is read through :class:`~megatron_qk.rundir.runlog.RunLog`; only finished runs
take part. The runs must form a paired comparison: a control arm, the same seeds in every arm,
configs equal beyond :data:`IGNORED_KEYS`, and (unless allowed) the same training order and
validation set. The computations on the validated runs are :mod:`megatron_qk.analysis.compare`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from megatron_qk.analysis.compare import DEFAULT_CONTROL, CompareError, Run, compare_runs
from megatron_qk.analysis.eval_table import eval_table
from megatron_qk.config.loader import config_to_dict, load_resolved_config
from megatron_qk.rundir.config_hash import flatten_config
from megatron_qk.rundir.finder import RunFinderError, find_runs, run_label
from megatron_qk.rundir.layout import EVAL_GLOB
from megatron_qk.rundir.runlog import RunLog

# Keys allowed to differ between compared runs: identity, location, logging, the keys that may
# change on a resume (they do not change the trained model) and the interventions' own knobs,
# those of the paper and those compared beside it (QK-norm, QK-clip: docs/BEYOND_QK.md).
IGNORED_KEYS = frozenset(
    "arm name training.seed training.output_dir training.resume training.exit_after_steps "
    "training.log_interval optim.rules optim.lr_multiplier training.save_at_fracs "
    "training.keep_interval_checkpoints model.qk_layernorm".split()
)
IGNORED_PREFIXES = ("logging.", "optim.entropy_floor.", "optim.qk_clip.")


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths`` (each a run directory or a parent of some), as reached.

    Through :func:`megatron_qk.rundir.finder.find_runs`: links are followed (runs shared by
    tables), a link cycle is refused and a run reached twice is listed once.

    Raises:
        CompareError: for a missing path, a link cycle or a directory without any run.
    """
    try:
        return [run.path for run in find_runs(paths)]
    except RunFinderError as exc:
        raise CompareError(str(exc)) from None


def _compared(key: str) -> bool:
    return key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES)


def load_finished_run(run_dir: Path) -> Run:
    """A finished run directory as the comparison needs it (read through :class:`RunLog`).

    Its arm is the one it stands for where it was reached (:func:`run_label`): a run linked in
    from another table is the arm its link is named for.

    Raises:
        CompareError: when the run did not finish or its files are missing or malformed.
    """
    log = RunLog(run_dir)
    summary_path = log.summary_path
    try:
        summary = log.summary()
    except json.JSONDecodeError as exc:
        raise CompareError(f"{summary_path}: invalid JSON ({exc})") from None
    if summary is None:
        raise CompareError(f"{run_dir}: the run did not finish (no summary.json)")
    if not summary.get("finished", False):
        raise CompareError(
            f"{run_dir}: the run did not finish (step {summary.get('steps')} of "
            f"{summary.get('planned_steps')})"
        )
    if summary.get("final_val_loss") is None or summary.get("final_val_ppl") is None:
        raise CompareError(f"{summary_path}: no final_val_loss/final_val_ppl")
    if not log.config_path.is_file():
        raise CompareError(f"{run_dir}: no config.yaml")
    try:
        cfg = load_resolved_config(log.config_path)
    except ValueError as exc:
        raise CompareError(f"{log.config_path}: {exc}") from None
    if not log.has_metrics():
        raise CompareError(f"{run_dir}: no metrics.jsonl")
    try:
        evals = log.evals_by_step()
    except ValueError as exc:
        raise CompareError(str(exc)) from None
    if not evals:
        raise CompareError(f"{log.metrics_path}: no eval lines")
    curve = []
    for rec in evals.values():
        val = rec.get("val_loss")
        curve.append((float(rec["tokens"]), math.nan if val is None else val))
    return Run(
        path=str(run_dir),
        arm=run_label(run_dir, cfg.arm, cfg.training.seed),
        seed=cfg.training.seed,
        final_val_loss=float(summary["final_val_loss"]),
        final_val_ppl=float(summary["final_val_ppl"]),
        tokens=int(summary["tokens"]),
        curve=curve,
        config=flatten_config(config_to_dict(cfg)),
        data_order=summary.get("data_order"),
    )


def config_differences(a: dict, b: dict) -> list[str]:
    """Dotted keys whose values differ between two flattened configs (ignored keys excluded)."""
    return sorted(k for k in set(a) | set(b) if _compared(k) and a.get(k) != b.get(k))


def validate_runs(
    runs: Sequence[Run], control_arm: str, allow_different_data: bool = False
) -> None:
    """Check that the runs form a paired comparison.

    Raises:
        CompareError: for a missing control arm, two runs with the same arm and seed, a seed
            present in one arm but not another, configs that differ beyond the ignored keys, or
            (unless ``allow_different_data``) runs whose ``data_order`` differs.
    """
    by_arm: dict[str, dict[int, Run]] = {}
    for run in runs:
        other = by_arm.setdefault(run.arm, {}).get(run.seed)
        if other is not None:
            raise CompareError(
                f"{run.path} and {other.path} are both arm {run.arm!r} seed {run.seed}"
            )
        by_arm[run.arm][run.seed] = run
    if control_arm not in by_arm:
        raise CompareError(
            f"no run of the control arm {control_arm!r} among arms {sorted(by_arm)} "
            f"({', '.join(r.path for r in runs)}); choose one with --control"
        )
    if len(by_arm) < 2:
        raise CompareError(
            f"only the control arm {control_arm!r} ({', '.join(r.path for r in runs)}): "
            "nothing to compare"
        )
    control = by_arm[control_arm]
    for arm, group in sorted(by_arm.items()):
        if arm == control_arm:
            continue
        extra = sorted(set(group) - set(control))
        if extra:
            raise CompareError(
                f"{group[extra[0]].path}: seed {extra[0]} of arm {arm!r} has no "
                f"{control_arm!r} run (unpaired seed)"
            )
        missing = sorted(set(control) - set(group))
        if missing:
            raise CompareError(
                f"{control[missing[0]].path}: seed {missing[0]} of arm {control_arm!r} has no "
                f"{arm!r} run (unpaired seed)"
            )
    reference = control[min(control)]
    for run in runs:
        diff = config_differences(reference.config, run.config)
        if diff:
            details = ", ".join(
                f"{k}: {reference.config.get(k)!r} vs {run.config.get(k)!r}" for k in diff[:8]
            )
            more = f" (+{len(diff) - 8} more)" if len(diff) > 8 else ""
            raise CompareError(
                f"{run.path} and {reference.path} have mismatched configs: {details}{more}"
            )
    if not allow_different_data:
        check_same_data_order(runs)


def check_same_data_order(runs: Sequence[Run]) -> None:
    """Refuse runs that read different training orders or validation sets.

    Runs without ``data_order`` (written before it existed) are not checked.

    Raises:
        CompareError: naming two runs whose ``data_order`` differs.
    """
    known = [r for r in runs if r.data_order is not None]
    for run in known[1:]:
        if run.data_order != known[0].data_order:
            raise CompareError(
                f"{run.path} and {known[0].path} read different data (data_order "
                f"{run.data_order} vs {known[0].data_order}: training order or validation set "
                "differ, e.g. another training.data_seed or dataset); pass "
                "--allow-different-data to compare them anyway"
            )


def load_and_compare(
    paths: Iterable[str | Path],
    control_arm: str = DEFAULT_CONTROL,
    allow_different_data: bool = False,
) -> dict:
    """Find, load, validate and compare runs (the whole command without printing).

    Raises:
        CompareError: see :func:`find_run_dirs`, :func:`load_finished_run`, :func:`validate_runs`.
    """
    runs = [load_finished_run(p) for p in find_run_dirs(paths)]
    validate_runs(runs, control_arm, allow_different_data)
    return compare_runs(runs, control_arm)


def downstream_table(
    run_dirs: list[str], control_arm: str, metric: str = "acc"
) -> tuple[str, dict] | None:
    """The downstream (Table 2) view when some run has ``megatron-qk eval`` reports.

    Args:
        run_dirs: the compared run directories, as reached.
        control_arm: the baseline arm.
        metric: ``acc`` or ``acc_norm`` (``acc`` where a task has no normalised accuracy).

    Returns:
        ``(markdown, data)`` of :func:`~megatron_qk.analysis.eval_table.eval_table`, or None when
        no run directory holds a report (``eval*.json``) or the table is empty.

    Raises:
        CompareError: when the downstream table cannot be built from the reports present.
    """
    if not any(any(Path(d).glob(EVAL_GLOB)) for d in run_dirs):
        return None
    try:
        markdown, data = eval_table(run_dirs, control_arm, metric=metric)
    except ValueError as exc:
        raise CompareError(f"downstream table: {exc}") from None
    return (markdown, data) if markdown else None
