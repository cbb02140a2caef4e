"""``megatron-qk compare``: paired-seed comparison of finished runs (the paper's Table 1).

Runs are grouped by ``arm`` and paired by ``training.seed``; every arm other than the control is
compared with the control run of the same seed:

* final validation loss and perplexity per arm: mean +- *sample* standard deviation over seeds
  ("n/a" with a single seed);
* paired differences (arm minus control), mean +- sample sd over seeds;
* tokens to reach the control's final loss. The target of a run is the final validation loss of
  *its paired control run* (same seed), not the mean over control seeds, so each difference is a
  within-pair quantity like the loss differences. The tokens are read off the run's own eval
  curve: the first evaluation whose ``val_loss <= target`` and, when an earlier evaluation lies
  above it, linear interpolation of tokens vs val_loss between the two; a run whose curve never
  reaches the target is reported as not reached. The control itself needs, by definition, its
  whole budget (the tokens of its final evaluation), as in Table 1;
* token saving = control tokens - tokens to target, in tokens and in % of the control's tokens.

The computations are pure functions (:func:`mean_sd`, :func:`tokens_to_target`,
:func:`paired_differences`, :func:`token_saving`, :func:`compare_runs`); the I/O is separate.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_qk.analysis.compare_format import format_table
from megatron_qk.training.sinks import read_metrics

DEFAULT_CONTROL = "control"
# Keys allowed to differ between compared runs: identity, location, logging, the keys that may
# change on a resume (they do not change the trained model) and the interventions' own knobs.
IGNORED_KEYS = frozenset(
    "arm name training.seed training.output_dir training.resume training.exit_after_steps "
    "training.log_interval optim.rules optim.lr_multiplier training.save_at_fracs "
    "training.keep_interval_checkpoints".split()
)
IGNORED_PREFIXES = ("logging.", "optim.entropy_floor.")
EVAL_TABLE_MODULE = "megatron_qk.analysis.eval_table"


class CompareError(ValueError):
    """The given run directories cannot be compared (the message names the run directory)."""


@dataclass
class Run:
    """One finished run as the comparison needs it.

    Attributes:
        path: the run directory.
        arm: ``arm`` of its config.
        seed: ``training.seed`` of its config.
        final_val_loss: from summary.json.
        final_val_ppl: from summary.json.
        tokens: training tokens of the run (summary.json).
        curve: ``(tokens, val_loss)`` of every evaluation, in training order.
        config: the flattened resolved config (dotted keys).
    """

    path: str
    arm: str
    seed: int
    final_val_loss: float
    final_val_ppl: float
    tokens: int
    curve: list[tuple[float, float]] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    # summary.json's fingerprint of the training order and validation set (None: older run).
    data_order: str | None = None


# ------------------------------------------------------------------------------------------
# Pure computations
# ------------------------------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for fewer than two values).

    Raises:
        ValueError: for an empty sequence.
    """
    if not values:
        raise ValueError("mean_sd of no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def tokens_to_target(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """Tokens at which an eval curve first reaches ``val_loss <= target``.

    Points with a non-finite loss are skipped. If the first (finite) point already reaches the
    target its tokens are returned; otherwise tokens are interpolated linearly in
    ``(tokens, val_loss)`` between the last point above the target and the first at or below it.

    Args:
        curve: ``(tokens, val_loss)`` pairs in training order.
        target: the loss to reach.

    Returns:
        The interpolated token count, or None when the curve never reaches the target.
    """
    points = [(float(t), float(v)) for t, v in curve if math.isfinite(v)]
    for i, (tokens, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return tokens
            t0, l0 = points[i - 1]
            # l0 > target >= loss, so l0 - loss > 0.
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
    return None


def paired_differences(control: dict[int, float], other: dict[int, float]) -> dict[int, float]:
    """``other[seed] - control[seed]`` for every seed (both must have the same seeds).

    Raises:
        ValueError: when the seed sets differ.
    """
    if set(control) != set(other):
        raise ValueError(f"seed sets differ: {sorted(control)} vs {sorted(other)}")
    return {seed: other[seed] - control[seed] for seed in sorted(control)}


def token_saving(control_tokens: float, tokens: float | None) -> tuple[float, float] | None:
    """Saving of a run that reached the target after ``tokens``: (tokens saved, % of control).

    Returns:
        ``(control_tokens - tokens, 100 * saved / control_tokens)``, or None when not reached.
    """
    if tokens is None:
        return None
    saved = control_tokens - tokens
    return saved, 100.0 * saved / control_tokens


def _stats(values: Sequence[float]) -> dict:
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": sd, "n": len(values)}


def compare_runs(runs: Sequence[Run], control_arm: str = DEFAULT_CONTROL) -> dict:
    """The comparison of already validated runs (see :func:`validate_runs`) as plain data.

    Returns:
        ``{"control_arm", "target", "seeds", "arms": {arm: {...}}, "differences": {arm: {...}},
        "pairs": [...]}``; token quantities of arms where some seed never reached the target
        have ``None`` statistics.
    """
    by_arm: dict[str, dict[int, Run]] = {}
    for run in runs:
        by_arm.setdefault(run.arm, {})[run.seed] = run
    control = by_arm[control_arm]
    seeds = sorted(control)
    arms_out: dict[str, dict] = {}
    diffs_out: dict[str, dict] = {}
    pairs: list[dict] = []
    ctl_tokens = {s: float(control[s].tokens) for s in seeds}
    ordered = [control_arm] + sorted(a for a in by_arm if a != control_arm)
    for arm in ordered:
        group = by_arm[arm]
        loss = {s: group[s].final_val_loss for s in seeds}
        ppl = {s: group[s].final_val_ppl for s in seeds}
        entry = {
            "runs": [group[s].path for s in seeds],
            "final_val_loss": _stats(list(loss.values())),
            "final_val_ppl": _stats(list(ppl.values())),
        }
        if arm == control_arm:
            entry["tokens_to_target"] = _stats(list(ctl_tokens.values()))
            entry["token_saving"] = None
            arms_out[arm] = entry
            continue
        reached = {s: tokens_to_target(group[s].curve, control[s].final_val_loss) for s in seeds}
        savings = {s: token_saving(ctl_tokens[s], reached[s]) for s in seeds}
        all_reached = all(v is not None for v in reached.values())
        entry["reached"] = sum(v is not None for v in reached.values())
        entry["tokens_to_target"] = _stats(list(reached.values())) if all_reached else None
        entry["token_saving"] = None
        if all_reached:
            entry["token_saving"] = {
                unit: _stats([savings[s][i] for s in seeds])
                for i, unit in enumerate(("tokens", "percent"))
            }
        arms_out[arm] = entry
        d_loss = paired_differences({s: control[s].final_val_loss for s in seeds}, loss)
        d_ppl = paired_differences({s: control[s].final_val_ppl for s in seeds}, ppl)
        diffs_out[arm] = {
            "final_val_loss": _stats(list(d_loss.values())),
            "final_val_ppl": _stats(list(d_ppl.values())),
            "tokens_to_target": (
                _stats([reached[s] - ctl_tokens[s] for s in seeds]) if all_reached else None
            ),
        }
        for s in seeds:
            saved, pct = savings[s] or (None, None)
            pairs.append(
                dict(seed=s, arm=arm, run=group[s].path, control_run=control[s].path)
                | dict(target_val_loss=control[s].final_val_loss, control_tokens=ctl_tokens[s])
                | dict(final_val_loss_diff=d_loss[s], final_val_ppl_diff=d_ppl[s])
                | dict(tokens_to_target=reached[s], saving_tokens=saved, saving_percent=pct)
            )
    return {
        "control_arm": control_arm,
        "target": "final val_loss of the paired control run (same seed)",
        "seeds": seeds,
        "arms": arms_out,
        "differences": diffs_out,
        "pairs": pairs,
    }


# ------------------------------------------------------------------------------------------
# I/O and validation
# ------------------------------------------------------------------------------------------
def _is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file() or (path / "config.yaml").is_file()


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each path is a run directory or a parent of some.

    A parent is searched recursively for directories holding ``summary.json`` or
    ``config.yaml`` (not descending into a run directory found).

    Raises:
        CompareError: for a missing path or a directory without any run directory.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise CompareError(f"{path}: not a directory")
        if _is_run_dir(path):
            found.append(path)
            continue
        below = []
        for top, dirs, _ in os.walk(path):
            dirs.sort()
            if _is_run_dir(Path(top)):
                below.append(Path(top))
                dirs.clear()  # not into checkpoints/ etc.
        if not below:
            raise CompareError(f"{path}: no run directory (summary.json/config.yaml) found")
        found.extend(below)
    return list(dict.fromkeys(p.resolve() for p in found))


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested mapping to dotted keys (lists stay values)."""
    out = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def _compared(key: str) -> bool:
    return key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES)


def load_run(run_dir: Path) -> Run:
    """Read a finished run directory.

    Raises:
        CompareError: when the run did not finish or its files are missing or malformed.
    """
    from megatron_qk.config.loader import config_to_dict, load_resolved_config

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise CompareError(f"{run_dir}: the run did not finish (no summary.json)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CompareError(f"{summary_path}: invalid JSON ({exc})") from None
    if not summary.get("finished", False):
        raise CompareError(
            f"{run_dir}: the run did not finish (step {summary.get('steps')} of "
            f"{summary.get('planned_steps')})"
        )
    if summary.get("final_val_loss") is None or summary.get("final_val_ppl") is None:
        raise CompareError(f"{summary_path}: no final_val_loss/final_val_ppl")
    if not (run_dir / "config.yaml").is_file():
        raise CompareError(f"{run_dir}: no config.yaml")
    try:
        cfg = load_resolved_config(run_dir / "config.yaml")
    except ValueError as exc:
        raise CompareError(f"{run_dir / 'config.yaml'}: {exc}") from None
    curve: dict[int, tuple[float, float]] = {}
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise CompareError(f"{run_dir}: no metrics.jsonl")
    try:
        records = read_metrics(metrics)
    except ValueError as exc:
        raise CompareError(str(exc)) from None
    for rec in records:
        if rec.get("kind") == "eval":
            val = rec.get("val_loss")
            curve[int(rec["step"])] = (float(rec["tokens"]), math.nan if val is None else val)
    if not curve:
        raise CompareError(f"{metrics}: no eval lines")
    return Run(
        path=str(run_dir),
        arm=cfg.arm,
        seed=cfg.training.seed,
        final_val_loss=float(summary["final_val_loss"]),
        final_val_ppl=float(summary["final_val_ppl"]),
        tokens=int(summary["tokens"]),
        curve=[curve[s] for s in sorted(curve)],
        config=flatten(config_to_dict(cfg)),
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
        CompareError: see :func:`find_run_dirs`, :func:`load_run` and :func:`validate_runs`.
    """
    runs = [load_run(p) for p in find_run_dirs(paths)]
    validate_runs(runs, control_arm, allow_different_data)
    return compare_runs(runs, control_arm)


def _eval_table(run_dirs: list[str], control_arm: str) -> tuple[str, dict] | None:
    """The downstream (Table 2) view when its module exists and some run has eval reports.

    Returns:
        ``(markdown, data)`` of ``eval_table(run_dirs, control_arm)``, or None when the module or
        its function is absent, or no run directory holds a report (the module's ``EVAL_GLOB``,
        default ``eval*.json``).

    Raises:
        CompareError: when the downstream table cannot be built from the reports present.
    """
    if importlib.util.find_spec(EVAL_TABLE_MODULE) is None:
        return None
    module = importlib.import_module(EVAL_TABLE_MODULE)
    func = getattr(module, "eval_table", None)
    pattern = getattr(module, "EVAL_GLOB", "eval*.json")
    if func is None or not any(any(Path(d).glob(pattern)) for d in run_dirs):
        return None
    try:
        markdown, data = func(run_dirs, control_arm)
    except ValueError as exc:
        raise CompareError(f"downstream table: {exc}") from None
    return (markdown, data) if markdown else None


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the compare options."""
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="finished run directories, or parent directories holding them",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument(
        "--control",
        default=DEFAULT_CONTROL,
        metavar="ARM",
        help=f"arm the others are compared with (default {DEFAULT_CONTROL})",
    )
    parser.add_argument(
        "--allow-different-data",
        action="store_true",
        help="pair runs even when their summary.json data_order (training order and "
        "validation set) differs",
    )


def run(args: argparse.Namespace) -> int:
    """Print the comparison table (and write ``--json``); exit code 2 on invalid input."""
    try:
        result = load_and_compare(args.run_dirs, args.control, args.allow_different_data)
    except CompareError as exc:
        print(f"megatron-qk compare: error: {exc}", file=sys.stderr)
        return 2
    text = format_table(result)
    try:
        downstream = _eval_table(
            [r for a in result["arms"].values() for r in a["runs"]], args.control
        )
    except CompareError as exc:  # Table 1 stands on its own; say why Table 2 is missing
        downstream = None
        print(f"megatron-qk compare: warning: {exc}", file=sys.stderr)
    if downstream is not None:
        text += "\n\n" + downstream[0]
        result["eval_table"] = downstream[1]
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
