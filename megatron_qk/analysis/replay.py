"""``megatron-qk replay-release``: replay the maturity release rule on logged lower-copy scores.

The replay drives the trainer's own state machine,
:class:`~megatron_qk.optim.release.ReleaseController`, in the trainer's order:

1. ``on_step(0, 0.0)`` (the scheduler's constructor calls ``step(0)``);
2. ``observe`` of the step-0 evaluation, when one was logged;
3. for every step ``s = 1 .. end``: ``on_step(s, s / planned)`` (``scheduler.step`` after each
   optimizer step), then ``observe(s, s / planned, lower_copy, lower_copy_uniform)`` when an
   evaluation (a ``diag`` line) was logged after step ``s``.

Both threshold modes replay: ``absolute`` compares ``lower_copy`` with the threshold,
``over_uniform`` compares ``lower_copy / lower_copy_uniform`` (both logged on every ``diag``
line) with the ratio.

``end`` is the last step the metrics file reaches (capped at the planned steps): for a finished
run every step ``1 .. planned_steps``; for an unfinished one the replay stops where the log does
instead of inventing a forced release the run has not reached yet. With the run's own settings
the replayed release is therefore the one training made (the ``release`` lines), which the
command checks; other settings give the paper's offline replay (Table 8).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from megatron_qk.analysis.replay_format import format_aggregate, format_report
from megatron_qk.config.release import PAPER_RELEASE
from megatron_qk.optim.release import ENTROPY_FLOOR_NAME, ReleaseController, ReleaseEvent
from megatron_qk.training.sinks import read_metrics

PAPER_DEFAULTS = {
    k: getattr(PAPER_RELEASE, k) for k in ("threshold", "patience", "min_frac", "max_frac")
}
DEFAULT_RULE = "upper_qk"
# The paper's Table 8 variants, each changing one setting of the main rule. They are relative
# so that they stay "nearby" for any main rule; for the paper's rule (0.005 / 3 / 3-12%) they
# are exactly Table 8's rows: threshold 0.003 and 0.007, patience 1 and 5, window 3-8%.
TABLE8_VARIANTS = (
    ("Lower threshold", lambda s: _scaled_threshold(s, 0.6)),
    ("Higher threshold", lambda s: _scaled_threshold(s, 1.4)),
    ("No patience", lambda s: {"patience": 1}),
    ("Stricter patience", lambda s: {"patience": s.patience + 2}),
    ("Shorter forced window", lambda s: {"max_frac": round(s.max_frac * 2 / 3, 12)}),
)


def _scaled_threshold(s: ReleaseSettings, factor: float) -> dict:
    """The compared threshold times ``factor`` (the ratio in ``over_uniform`` mode)."""
    if s.threshold_mode == "over_uniform":
        return {"threshold_ratio": round(s.threshold_ratio * factor, 12)}
    return {"threshold": round(s.threshold * factor, 12)}


class ReplayError(ValueError):
    """The metrics file (or its run's config) cannot be replayed; the message names the file."""


@dataclass(frozen=True)
class ReleaseSettings:
    """The maturity rule's parameters (see :class:`ReleaseController`)."""

    threshold: float = PAPER_DEFAULTS["threshold"]
    patience: int = PAPER_DEFAULTS["patience"]
    min_frac: float = PAPER_DEFAULTS["min_frac"]
    max_frac: float = PAPER_DEFAULTS["max_frac"]
    threshold_mode: str = "absolute"
    threshold_ratio: float | None = None

    @property
    def compared_threshold(self) -> float:
        """What the maturity score is compared with (the threshold or the ratio)."""
        return self.threshold_ratio if self.threshold_mode == "over_uniform" else self.threshold


@dataclass
class RunLog:
    """What the replay reads from a metrics file (and the run's config next to it).

    Attributes:
        scores: ``(step, lower_copy, lower_copy_uniform)`` of every ``diag`` line, in file
            order (NaN for null or, in logs written before the baseline existed, absent).
        releases: the logged ``release`` lines by rule name.
        last_step: the largest step of any line.
        planned_steps: planned optimizer steps.
        rule_settings: maturity settings of every rule the run's config defines by name
            (multiplier rules with ``release: maturity`` and an enabled entropy floor).
        default_rule: the first maturity rule of the config, or None.
        config_path: the config.yaml used, or None.
    """

    scores: list[tuple[int, float, float]]
    releases: dict[str, dict]
    last_step: int
    planned_steps: int
    rule_settings: dict[str, ReleaseSettings]
    default_rule: str | None
    config_path: str | None


# ------------------------------------------------------------------------------------------
# The replay (pure)
# ------------------------------------------------------------------------------------------
def _controller(name: str, planned_steps: int, settings: ReleaseSettings) -> ReleaseController:
    return ReleaseController(
        name=name,
        policy="maturity",
        planned_steps=planned_steps,
        hold_value=1.0,
        threshold=settings.threshold,
        patience=settings.patience,
        min_frac=settings.min_frac,
        max_frac=settings.max_frac,
        threshold_mode=settings.threshold_mode,
        threshold_ratio=settings.threshold_ratio,
    )


def replay_release(
    scores: Sequence[tuple[int, float] | tuple[int, float, float]],
    planned_steps: int,
    settings: ReleaseSettings,
    end_step: int | None = None,
    name: str = DEFAULT_RULE,
) -> ReleaseEvent | None:
    """Replay the maturity rule over steps ``0 .. end_step`` in the trainer's order.

    Args:
        scores: ``(step, lower_copy)`` or ``(step, lower_copy, lower_copy_uniform)`` of the
            evaluations (NaN: no valid position; ``over_uniform`` needs the baseline).
        planned_steps: the run's planned optimizer steps (fractions are ``step / planned``).
        settings: threshold, patience and window.
        end_step: last completed step to replay (default ``planned_steps``).
        name: rule name put in the event.

    Returns:
        The release event, or None when neither maturity nor the forced release happened by
        ``end_step``.
    """
    end = planned_steps if end_step is None else min(int(end_step), planned_steps)
    ctl = _controller(name, planned_steps, settings)
    at_step: dict[int, list[tuple[float, float]]] = {}
    for step, copy, *uniform in scores:
        base = float(uniform[0]) if uniform else math.nan
        at_step.setdefault(int(step), []).append((float(copy), base))
    for step in range(0, end + 1):
        frac = step / planned_steps
        event = ctl.on_step(step, frac)
        if event is not None:
            return event
        for copy, base in at_step.get(step, ()):
            event = ctl.observe(step, frac, copy, base)
            if event is not None:
                return event
    return None


def first_crossing(
    scores: Sequence[tuple[int, float] | tuple[int, float, float]],
    threshold: float | ReleaseSettings,
) -> tuple[int, float] | None:
    """First ``(step, maturity score)`` at or above the threshold (the paper's maturity *event*).

    Args:
        scores: as for :func:`replay_release`.
        threshold: an absolute lower-copy threshold, or the settings (whose mode decides the
            score: ``over_uniform`` divides by the logged uniform baseline).
    """
    if not isinstance(threshold, ReleaseSettings):
        threshold = ReleaseSettings(threshold=float(threshold))
    ctl = _controller(DEFAULT_RULE, 1, threshold)
    for step, copy, *uniform in scores:
        score = ctl.maturity_score(copy, uniform[0] if uniform else math.nan)
        if not math.isnan(score) and score >= ctl.compared_threshold:
            return int(step), float(score)
    return None


# ------------------------------------------------------------------------------------------
# Reading a run
# ------------------------------------------------------------------------------------------
def _planned_from_lines(records: list[dict], path: Path) -> int | None:
    planned = set()
    for rec in records:
        frac, step = rec.get("frac"), rec.get("step")
        if isinstance(frac, int | float) and frac > 0 and isinstance(step, int):
            planned.add(round(step / frac))
    if len(planned) > 1:
        raise ReplayError(f"{path}: inconsistent step/frac (planned steps {sorted(planned)})")
    return planned.pop() if planned else None


def _config_rules(config_path: Path) -> tuple[int, dict[str, ReleaseSettings], str | None]:
    from megatron_qk.config.loader import load_resolved_config

    try:
        cfg = load_resolved_config(config_path)
    except ValueError as exc:
        raise ReplayError(f"{config_path}: {exc}") from None
    rules: dict[str, ReleaseSettings] = {}
    default = None
    for rule in cfg.optim.rules:
        if rule.release == "maturity":
            rules[rule.name] = ReleaseSettings(
                rule.threshold,
                rule.patience,
                rule.min_frac,
                rule.max_frac,
                rule.threshold_mode,
                rule.threshold_ratio,
            )
            default = default or rule.name
    floor = cfg.optim.entropy_floor
    if floor.enabled:
        rules[ENTROPY_FLOOR_NAME] = ReleaseSettings(
            floor.threshold,
            floor.patience,
            floor.min_frac,
            floor.max_frac,
            floor.threshold_mode,
            floor.threshold_ratio,
        )
        default = default or ENTROPY_FLOOR_NAME
    return cfg.planned_steps(), rules, default


def read_run_log(path: str | Path) -> RunLog:
    """Read a metrics.jsonl (or a run directory) and the config.yaml beside it, if any.

    Raises:
        ReplayError: for a missing or malformed file, no ``diag`` lines, or planned steps that
            cannot be determined or disagree with the config.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ReplayError(f"{path}: no such metrics file")
    try:
        records = read_metrics(path)
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    scores = []
    for rec in records:
        if rec.get("kind") == "diag":
            if "lower_copy" not in rec:
                raise ReplayError(f"{path}: diag line at step {rec.get('step')} has no lower_copy")
            value, base = rec["lower_copy"], rec.get("lower_copy_uniform")
            scores.append(
                (
                    int(rec["step"]),
                    math.nan if value is None else float(value),
                    math.nan if base is None else float(base),
                )
            )
    if not scores:
        raise ReplayError(f"{path}: no diag lines with lower_copy scores to replay")
    releases = {r["rule"]: r for r in records if r.get("kind") == "release"}
    from_lines = _planned_from_lines(records, path)
    config_path = path.parent / "config.yaml"
    rules: dict[str, ReleaseSettings] = {}
    default = None
    if config_path.is_file():
        planned, rules, default = _config_rules(config_path)
        if from_lines is not None and from_lines != planned:
            raise ReplayError(
                f"{path}: the lines imply {from_lines} planned steps but {config_path} plans "
                f"{planned}"
            )
    elif from_lines is not None:
        planned, config_path = from_lines, None
    else:
        raise ReplayError(f"{path}: no config.yaml beside it and no line with frac > 0")
    last = max(int(r.get("step", 0)) for r in records)
    return RunLog(
        scores=scores,
        releases=releases,
        last_step=last,
        planned_steps=planned,
        rule_settings=rules,
        default_rule=default,
        config_path=None if config_path is None else str(config_path),
    )


def resolve_settings(
    log: RunLog, rule: str | None, overrides: dict[str, float | int | None]
) -> tuple[str, ReleaseSettings, bool]:
    """The rule name and settings to replay: flags over the run's rule over the paper's defaults.

    Returns:
        ``(rule name, settings, same_as_run)``; ``same_as_run`` is True when the settings are the
        run's own for that rule (so the replay must reproduce its logged release).

    Raises:
        ReplayError: when ``rule`` is given but the run's config has no maturity rule of that name.
    """
    if rule is not None and log.config_path is not None and rule not in log.rule_settings:
        raise ReplayError(
            f"{log.config_path}: no maturity rule {rule!r} (maturity rules: "
            f"{sorted(log.rule_settings)})"
        )
    name = rule or log.default_rule or DEFAULT_RULE
    run_settings = log.rule_settings.get(name)
    base = run_settings or ReleaseSettings()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "threshold_ratio" in overrides:  # a ratio only means something over the baseline
        overrides.setdefault("threshold_mode", "over_uniform")
    settings = replace(base, **overrides)
    return name, settings, run_settings is not None and settings == run_settings


def _settings_source(same: bool, in_run: bool, overrides: dict) -> str:
    if same:
        return "the run's config"
    if in_run:
        return "the run's config with flag overrides"
    if any(v is not None for v in overrides.values()):
        return "flags over the paper's defaults"
    return "the paper's defaults"


def replay_run(
    path: str | Path,
    rule: str | None = None,
    overrides: dict[str, float | int | None] | None = None,
    variants: bool = False,
) -> dict:
    """Replay a run's release (and optionally the Table 8 variants) as plain data.

    Returns:
        ``{"metrics", "rule", "planned_steps", "replayed_through_step", "settings",
        "settings_from", "replayed", "logged", "agrees", "first_crossing", "variants"}``.
        ``agrees`` is None when the settings are not the run's own (no agreement expected).
    """
    log = read_run_log(path)
    name, settings, same = resolve_settings(log, rule, overrides or {})
    end = min(log.last_step, log.planned_steps)

    def one(s: ReleaseSettings) -> dict | None:
        event = replay_release(log.scores, log.planned_steps, s, end, name)
        return None if event is None else event.to_dict()

    replayed = one(settings)
    logged = log.releases.get(name)
    logged_out = None
    if logged is not None:
        logged_out = {k: logged[k] for k in ("rule", "reason", "step", "frac")}
    agrees = None
    if same:
        agrees = (replayed is None and logged is None) or (
            replayed is not None
            and logged is not None
            and (replayed["step"], replayed["reason"]) == (logged["step"], logged["reason"])
        )
    # A log that ends at the step the replay releases may have been cut (killed run, copy in
    # progress) just before the run could write that release line: nothing to compare yet.
    cut_before_release = (
        same and logged is None and replayed is not None and replayed["step"] >= log.last_step
    )
    if cut_before_release:
        agrees = None
    crossing = first_crossing(log.scores, settings)
    out = {
        "metrics": str(path),
        "rule": name,
        "planned_steps": log.planned_steps,
        "replayed_through_step": end,
        "settings": asdict(settings),
        "settings_from": _settings_source(same, name in log.rule_settings, overrides or {}),
        "replayed": replayed,
        "logged": logged_out,
        "agrees": agrees,
        "first_crossing": (
            None
            if crossing is None
            else {"step": crossing[0], "frac": crossing[0] / log.planned_steps}
        ),
        "variants": [],
        "log_ends_at_release": cut_before_release,
    }
    if variants:
        rows = [("Main rule", settings)]
        rows += [
            (label, replace(settings, **change(settings))) for label, change in TABLE8_VARIANTS
        ]
        for label, s in rows:
            row = {"label": label, "settings": asdict(s), "replayed": None, "invalid": None}
            try:
                row["replayed"] = one(s)
            except ValueError as exc:  # e.g. the shorter window ends before this run's min_frac
                row["invalid"] = str(exc)
            out["variants"].append(row)
    return out


# ------------------------------------------------------------------------------------------
# CLI (the text report is in replay_format.py)
# ------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the replay-release options."""
    parser.add_argument(
        "metrics",
        nargs="+",
        metavar="METRICS.jsonl",
        help="a run's metrics.jsonl (or dir); several runs (e.g. seeds) are replayed one by one "
        "and --variants aggregates them like Table 8",
    )
    parser.add_argument("--threshold", type=float, help="lower-copy threshold (absolute mode)")
    parser.add_argument(
        "--threshold-mode",
        choices=("absolute", "over_uniform"),
        help="absolute: lower_copy >= threshold; over_uniform: lower_copy / lower_copy_uniform "
        ">= threshold-ratio",
    )
    parser.add_argument("--threshold-ratio", type=float, help="ratio of over_uniform mode")
    parser.add_argument("--patience", type=int, help="consecutive in-window evaluations")
    parser.add_argument("--min-frac", type=float, help="evaluations before this do not count")
    parser.add_argument("--max-frac", type=float, help="forced release at this fraction")
    parser.add_argument(
        "--rule", help="rule of the run's config to replay (default: its first maturity rule)"
    )
    parser.add_argument(
        "--variants", action="store_true", help="also replay the paper's Table 8 variants"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.epilog = (
        "Settings not given come from the first maturity rule in the config.yaml beside the "
        "metrics file, else the paper's 0.005 / 3 / 0.03 / 0.12."
    )


def run(args: argparse.Namespace) -> int:
    """Replay and print; exit 2 on invalid input, 1 when the replay disagrees with the run."""
    overrides = {
        "threshold": args.threshold,
        "threshold_mode": args.threshold_mode,
        "threshold_ratio": args.threshold_ratio,
        "patience": args.patience,
        "min_frac": args.min_frac,
        "max_frac": args.max_frac,
    }
    try:
        results = [replay_run(m, args.rule, overrides, args.variants) for m in args.metrics]
    except ValueError as exc:  # ReplayError, or an invalid setting refused by the controller
        print(f"megatron-qk replay-release: error: {exc}", file=sys.stderr)
        return 2
    disagrees = any(r["agrees"] is False for r in results)
    if len(results) == 1:
        result = results[0]
        print(json.dumps(result, indent=2) if args.json else format_report(result))
        return 1 if disagrees else 0
    from megatron_qk.analysis.replay_aggregate import aggregate_variants

    table = aggregate_variants(results) if args.variants else []
    if args.json:
        print(json.dumps({"runs": results, "variants": table}, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in results))
        if table:
            print("\n" + format_aggregate(table, len(results)))
    return 1 if disagrees else 0
