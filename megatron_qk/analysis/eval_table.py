"""Table 2 of the paper: downstream accuracy of control vs intervention, paired by seed.

Inputs are run directories. Each holds the reports of ``megatron-qk eval``:

* ``RUN_DIR/eval.json``: the default ``--out`` when ``--checkpoint`` names the run (its newest
  checkpoint);
* ``RUN_DIR/eval_iter_XXXXXXX.json``: the default when ``--checkpoint`` names one checkpoint;
* any other ``RUN_DIR/eval*.json`` written with ``--out`` (e.g. ``eval_mmlu.json`` when the
  suite is scored in several invocations).

Per run, the reports of the highest checkpoint step are used and their tasks merged (a task
scored twice at that step must agree). The run's ``arm`` and ``seed`` come from
``summary.json`` (or, for an unfinished run, from the report, which records the recipe's).
Runs pair up by seed across the control and the intervention arm.

Columns: the mean +- sample standard deviation of the accuracy over runs of each arm, and the
paired intervention-minus-control delta in percentage points. The mean row averages each run's
accuracies over the tasks every paired run has (the suite average), then pairs those.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_qk.evaluation.suite import PAPER_SUITE, REPORT_FORMAT
from megatron_qk.rundir.finder import run_label
from megatron_qk.rundir.layout import EVAL_GLOB, SUMMARY_FILE

TASK_LABELS = {
    "piqa": "PIQA",
    "hellaswag": "HellaSwag",
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
    "race": "RACE",
    "lambada": "LAMBADA",
    "lambada_openai": "LAMBADA",
    "mmlu": "MMLU",
}


@dataclass
class RunEval:
    """The downstream results of one run at its newest evaluated step."""

    run_dir: Path
    arm: str
    seed: int
    step: int
    files: list[Path]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def load_run_eval(run_dir: str | Path) -> RunEval | None:
    """Read a run's ``eval*.json`` reports; ``None`` when it has none.

    Raises:
        FileNotFoundError: when ``run_dir`` is not a directory.
        ValueError: naming the file, for a report that is not ``megatron-qk eval``'s, reports
            that disagree on a task, or a run whose arm/seed cannot be found.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    files = sorted(run_dir.glob(EVAL_GLOB))
    if not files:
        return None
    reports = []
    for path in files:
        data = _read_json(path)
        if data.get("format") != REPORT_FORMAT or not isinstance(data.get("tasks"), dict):
            raise ValueError(
                f"{path}: not a `megatron-qk eval` report (format {data.get('format')!r}); "
                f"files named {EVAL_GLOB} in a run directory are read as such reports"
            )
        reports.append((path, data))
    step = max(int(d["step"]) for _, d in reports)
    used = [(p, d) for p, d in reports if int(d["step"]) == step]
    tasks: dict[str, dict] = {}
    source: dict[str, Path] = {}
    for path, data in used:
        for name, entry in data["tasks"].items():
            if name in tasks and _metrics(tasks[name]) != _metrics(entry):
                raise ValueError(
                    f"task {name!r} at step {step} has different results in {source[name]} "
                    f"and {path}; remove one of them"
                )
            tasks[name], source[name] = entry, path
    summary_path = run_dir / SUMMARY_FILE
    meta = _read_json(summary_path) if summary_path.exists() else {}
    arm = meta.get("arm", used[0][1].get("arm"))
    seed = meta.get("seed", used[0][1].get("seed"))
    if arm is None or seed is None:
        raise ValueError(f"{run_dir}: no arm/seed in summary.json or in {used[0][0].name}")
    # A run linked in from another table stands for the arm its link is named for.
    label = run_label(run_dir, str(arm), int(seed))
    return RunEval(run_dir, label, int(seed), step, [p for p, _ in used], tasks)


def _metrics(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k in ("acc", "acc_norm", "samples")}


def _value(entry: dict, metric: str) -> tuple[float | None, str]:
    """The task's score in ``metric`` (``acc_norm`` falls back to ``acc`` where undefined)."""
    value = entry.get(metric)
    if value is None and metric == "acc_norm":
        return entry.get("acc"), "acc"
    return value, metric


def _stats(values: list[float], scale: float = 1.0) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n * scale if n else None
    std = None
    if n >= 2:
        m = sum(values) / n
        std = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) * scale
    return {"mean": mean, "std": std, "n": n}


def _column(values: dict[int, float]) -> dict[str, Any]:
    """Stats of per-seed values, with the values (keyed by seed)."""
    return {**_stats(list(values.values())), "values": values}


def _task_order(names: set[str]) -> list[str]:
    suite = [t for t in PAPER_SUITE if t in names]
    return suite + sorted(names - set(suite))


def _pick_arms(runs: list[RunEval], control_arm: str, treatment_arm: str | None) -> str:
    arms = sorted({r.arm for r in runs})
    if control_arm not in arms:
        raise ValueError(f"no run of the control arm {control_arm!r} (arms found: {arms})")
    if treatment_arm is not None:
        if treatment_arm not in arms:
            raise ValueError(f"no run of the arm {treatment_arm!r} (arms found: {arms})")
        return treatment_arm
    others = [a for a in arms if a != control_arm]
    if len(others) != 1:
        raise ValueError(
            f"cannot choose the intervention arm among {others or 'none'}: "
            f"pass treatment_arm (arms found: {arms})"
        )
    return others[0]


def load_runs(run_dirs: list[str | Path]) -> tuple[list[RunEval], list[str]]:
    """Read every run's reports: ``(runs with reports, run directories without any)``.

    Raises:
        ValueError: when no run directory has a report (or see :func:`load_run_eval`).
    """
    runs, skipped = [], []
    for d in run_dirs:
        run = load_run_eval(d)
        (runs.append(run) if run is not None else skipped.append(str(d)))
    if not runs:
        raise ValueError(f"none of the run directories has {EVAL_GLOB} reports: {skipped}")
    return runs, skipped


def _check_metric(metric: str) -> None:
    if metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric must be acc or acc_norm, got {metric!r}")


def build_eval_table(
    run_dirs: list[str | Path],
    *,
    metric: str = "acc",
    control_arm: str = "control",
    treatment_arm: str | None = None,
    tasks: list[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Build the Table-2 view of downstream results for one pair of arms.

    Args:
        run_dirs: run directories; those without ``eval*.json`` are listed as skipped.
        metric: ``acc`` or ``acc_norm`` (which falls back to ``acc`` for tasks without it).
        control_arm: the arm name of the baseline runs.
        treatment_arm: the compared arm (default: the only other arm present).
        tasks: restrict (and order) the rows; default: every task scored in both arms.

    Returns:
        ``(markdown, data)``. ``data`` has ``rows`` (per task: ``control``/``treatment`` stats
        with ``mean``, ``std``, ``n`` and per-seed ``values``; ``delta_pp`` likewise; ``wins``),
        ``mean`` (the suite-average row and the ``tasks`` it covers), ``wins``/``comparisons``
        over all run-task pairs, ``seeds`` (paired), ``unpaired`` and ``skipped`` runs.

    Raises:
        ValueError: for no usable runs, unknown arms, or two runs of one arm with the same seed.
    """
    _check_metric(metric)
    runs, skipped = load_runs(run_dirs)
    treatment = _pick_arms(runs, control_arm, treatment_arm)
    data = _paired_table(runs, skipped, metric, control_arm, treatment, tasks)
    return format_eval_table(data), data


def eval_table(
    run_dirs: list[str | Path], control_arm: str = "control", *, metric: str = "acc"
) -> tuple[str, dict[str, Any]]:
    """Table 2 for every arm with reports against the control (what ``compare`` appends).

    Returns:
        ``(markdown, data)``: one titled table per non-control arm; ``data`` is
        ``{"metric", "control_arm", "tables": {arm: <build_eval_table data>}}``.

    Raises:
        ValueError: as :func:`build_eval_table`, or when no non-control arm has reports.
    """
    _check_metric(metric)
    runs, skipped = load_runs(run_dirs)
    arms = sorted({r.arm for r in runs} - {control_arm})
    if not arms:
        raise ValueError(f"only the control arm {control_arm!r} has {EVAL_GLOB} reports")
    tables, parts = {}, []
    for arm in arms:
        _pick_arms(runs, control_arm, arm)
        tables[arm] = _paired_table(runs, skipped, metric, control_arm, arm, None)
        parts.append(
            f"Downstream evaluation (Table 2): {arm} vs {control_arm}\n\n"
            + format_eval_table(tables[arm])
        )
    data = {"metric": metric, "control_arm": control_arm, "tables": tables}
    return "\n".join(parts), data


def _paired_table(
    runs: list[RunEval],
    skipped: list[str],
    metric: str,
    control_arm: str,
    treatment: str,
    tasks: list[str] | None,
) -> dict[str, Any]:
    """The data of :func:`build_eval_table` for two arms."""
    by_arm: dict[str, dict[int, RunEval]] = {control_arm: {}, treatment: {}}
    for run in runs:
        if run.arm not in by_arm:
            continue
        other = by_arm[run.arm].get(run.seed)
        if other is not None:
            raise ValueError(
                f"two {run.arm!r} runs with seed {run.seed}: {other.run_dir} and {run.run_dir}"
            )
        by_arm[run.arm][run.seed] = run
    ctrl, trt = by_arm[control_arm], by_arm[treatment]
    seeds = sorted(set(ctrl) & set(trt))
    unpaired = [
        {"run_dir": str(r.run_dir), "arm": r.arm, "seed": r.seed}
        for arm_runs in (ctrl, trt)
        for s, r in sorted(arm_runs.items())
        if s not in seeds
    ]
    scored = {arm: {t for r in rs.values() for t in r.tasks} for arm, rs in by_arm.items()}
    names = tasks if tasks is not None else _task_order(scored[control_arm] & scored[treatment])

    rows = []
    for name in names:
        values = {}
        used_metric = set()
        for key, arm_runs in (("control", ctrl), ("treatment", trt)):
            per_seed = {}
            for seed, run in sorted(arm_runs.items()):
                value, used = _value(run.tasks.get(name, {}), metric)
                if value is not None:
                    per_seed[seed] = value
                    used_metric.add(used)
            values[key] = per_seed
        deltas = {
            s: (values["treatment"][s] - values["control"][s]) * 100
            for s in seeds
            if s in values["control"] and s in values["treatment"]
        }
        rows.append(
            {
                "task": name,
                "label": TASK_LABELS.get(name, name),
                "metric": "/".join(sorted(used_metric)) or metric,
                "control": _column(values["control"]),
                "treatment": _column(values["treatment"]),
                "delta_pp": _column(deltas),
                "wins": sum(d > 0 for d in deltas.values()),
            }
        )

    suite = [
        r["task"]
        for r in rows
        if all(s in r["control"]["values"] and s in r["treatment"]["values"] for s in seeds)
    ]
    avg = {
        key: {
            s: sum(r[key]["values"][s] for r in rows if r["task"] in suite) / len(suite)
            for s in seeds
        }
        if suite
        else {}
        for key in ("control", "treatment")
    }
    mean_delta = {s: (avg["treatment"][s] - avg["control"][s]) * 100 for s in avg["treatment"]}
    mean_row = {
        "tasks": suite,
        "control": _column(avg["control"]),
        "treatment": _column(avg["treatment"]),
        "delta_pp": _column(mean_delta),
    }
    data = {
        "metric": metric,
        "control_arm": control_arm,
        "treatment_arm": treatment,
        "rows": rows,
        "mean": mean_row,
        "wins": sum(r["wins"] for r in rows),
        "comparisons": sum(r["delta_pp"]["n"] for r in rows),
        "seeds": seeds,
        "unpaired": unpaired,
        "skipped": skipped,
        "runs": [
            {
                "run_dir": str(r.run_dir),
                "arm": r.arm,
                "seed": r.seed,
                "step": r.step,
                "files": [str(p) for p in r.files],
            }
            for r in runs
            if r.arm in (control_arm, treatment)
        ],
    }
    return data


def _fmt(stats: dict, digits: int, signed: bool = False) -> str:
    if stats["mean"] is None:
        return "-"
    text = f"{stats['mean']:+.{digits}f}" if signed else f"{stats['mean']:.{digits}f}"
    if stats["std"] is not None:
        text += f" ± {stats['std']:.{digits}f}"
    return text


def format_eval_table(data: dict[str, Any]) -> str:
    """Markdown for :func:`build_eval_table`'s ``data`` (accuracies 4 digits, deltas 3)."""
    ctrl, trt = data["control_arm"], data["treatment_arm"]
    lines = [
        f"| Task | {ctrl} | {trt} | Delta pp |",
        "|---|---:|---:|---:|",
    ]
    for row in data["rows"]:
        label = row["label"] + (f" ({row['metric']})" if row["metric"] != data["metric"] else "")
        lines.append(
            f"| {label} | {_fmt(row['control'], 4)} | {_fmt(row['treatment'], 4)} "
            f"| {_fmt(row['delta_pp'], 3, signed=True)} |"
        )
    mean = data["mean"]
    if mean["tasks"]:
        lines.append(
            f"| Mean | {_fmt(mean['control'], 4)} | {_fmt(mean['treatment'], 4)} "
            f"| {_fmt(mean['delta_pp'], 3, signed=True)} |"
        )
    notes = [
        f"{data['metric']}, mean ± sample std over runs; Delta = paired {trt} - {ctrl} "
        f"(percentage points) over seeds {', '.join(map(str, data['seeds'])) or 'none'}; "
        f"{trt} wins {data['wins']} of {data['comparisons']} run-task comparisons."
    ]
    if mean["tasks"] and len(mean["tasks"]) != len(data["rows"]):
        notes.append(f"Mean row over the tasks every paired run has: {', '.join(mean['tasks'])}.")
    if data["unpaired"]:
        items = ", ".join(f"{u['arm']} seed {u['seed']}" for u in data["unpaired"])
        notes.append(f"Unpaired runs (in the arm columns, not in the deltas): {items}.")
    if data["skipped"]:
        notes.append(f"Runs without {EVAL_GLOB}: {', '.join(data['skipped'])}.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
