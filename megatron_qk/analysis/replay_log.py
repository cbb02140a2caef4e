"""Replaying a run's release from its run directory: what ``megatron-qk replay-release`` runs.

The run's ``diag`` and ``release`` lines come through :class:`~megatron_qk.rundir.runlog.RunLog`;
the settings are the flags over the run's own rule (its ``config.yaml``) over the paper's
defaults; the replay itself is :func:`megatron_qk.analysis.replay.replay_release`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from megatron_qk.analysis.replay import (
    DEFAULT_RULE,
    TABLE8_VARIANTS,
    ReleaseSettings,
    ReplayError,
    first_crossing,
    replay_release,
)
from megatron_qk.config.loader import load_resolved_config
from megatron_qk.optim.release import ENTROPY_FLOOR_NAME
from megatron_qk.rundir.finder import RunFinderError, find_runs, run_label
from megatron_qk.rundir.runlog import RunLog


@dataclass
class ReplayInput:
    """What the replay reads from a run's metrics file (and the run's config next to it).

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


def _planned_from_lines(records: list[dict], path: Path) -> int | None:
    planned = set()
    for rec in records:
        frac, step = rec.get("frac"), rec.get("step")
        if isinstance(frac, int | float) and frac > 0 and isinstance(step, int):
            planned.add(round(step / frac))
    if len(planned) > 1:
        raise ReplayError(f"{path}: inconsistent step/frac (planned steps {sorted(planned)})")
    return planned.pop() if planned else None


def _settings_of(rule: object) -> ReleaseSettings:
    """The maturity settings of a multiplier rule or entropy-floor config (same field names)."""
    return ReleaseSettings(**{f.name: getattr(rule, f.name) for f in fields(ReleaseSettings)})


def _config_rules(config_path: Path) -> tuple[int, dict[str, ReleaseSettings], str | None]:
    try:
        cfg = load_resolved_config(config_path)
    except ValueError as exc:
        raise ReplayError(f"{config_path}: {exc}") from None
    rules: dict[str, ReleaseSettings] = {}
    default = None
    for rule in cfg.optim.rules:
        if rule.release == "maturity":
            rules[rule.name] = _settings_of(rule)
            default = default or rule.name
    floor = cfg.optim.entropy_floor
    if floor.enabled:
        rules[ENTROPY_FLOOR_NAME] = _settings_of(floor)
        default = default or ENTROPY_FLOOR_NAME
    return cfg.planned_steps(), rules, default


def read_replay_input(path: str | Path) -> ReplayInput:
    """Read a run's metrics.jsonl (given as the file or its run directory) and its config.yaml.

    Raises:
        ReplayError: for a missing or malformed file, no ``diag`` lines, or planned steps that
            cannot be determined or disagree with the config.
    """
    log = RunLog(path)
    path = log.metrics_path
    if not log.has_metrics():
        raise ReplayError(f"{path}: no such metrics file")
    try:
        records = log.records
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    scores = []
    for rec in log.diags:
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
    releases = {r["rule"]: r for r in log.releases}  # a rule released twice: the last line
    from_lines = _planned_from_lines(records, path)
    config_path: Path | None = log.config_path
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
    return ReplayInput(
        scores=scores,
        releases=releases,
        last_step=log.last_step,
        planned_steps=planned,
        rule_settings=rules,
        default_rule=default,
        config_path=None if config_path is None else str(config_path),
    )


def replay_paths(paths: list[str], arm: str | None = None) -> list[str]:
    """The metrics files and run directories to replay: a file as given, a directory through
    the run finder (links followed, each run once), keeping only runs of ``arm`` when given
    (the arm a run stands for where it was reached, e.g. Table 1's ``intervention``).

    Raises:
        ReplayError: for a path that cannot be searched, or no run of ``arm``.
    """
    out: list[str] = []
    for raw in paths:
        if Path(raw).is_file():
            out.append(raw)
            continue
        try:
            found = find_runs([raw])
        except RunFinderError as exc:
            raise ReplayError(str(exc)) from None
        for run in found:
            if arm is None or _arm_of(run.path) == arm:
                out.append(str(run.path))
    if not out:
        raise ReplayError(f"no run of arm {arm!r} in {', '.join(paths)}")
    return out


def _arm_of(run_dir: Path) -> str | None:
    config = RunLog(run_dir).config_path
    if not config.is_file():
        return None
    cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    return run_label(run_dir, cfg.get("arm"), (cfg.get("training") or {}).get("seed"))


def resolve_settings(
    log: ReplayInput, rule: str | None, overrides: dict[str, float | int | None]
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
    log = read_replay_input(path)
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
