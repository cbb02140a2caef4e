"""The paper's early-training readout columns from run directories (``megatron-qk readout``).

Tables 3, 4, 6, 9 and 10 have "@3%" columns, Table 5 is read at 3% of runs stopped at 20%,
Table 7 reads 20%, Appendix C and Section 5.6 quote relative FFN-write reductions and Figure 2
plots the intervention's gain against early upper entropy across architectures. All of them are
``diag`` lines of the runs' ``metrics.jsonl`` plus the final perplexity of ``summary.json``, so
this command reads files only (no torch, no checkpoint).

*Which evaluation is "at 3%".* The ``diag`` line whose step is nearest to ``frac x planned
steps`` (the earlier one on a tie); its actual step and fraction are printed next to the values.
With the paper's recipes (evaluations at round(k x 0.5% x 4769) steps,
``training.eval_interval_frac``) 3% reads step 143 and 20% step 954, the steps of the
``save_at_fracs`` checkpoints. A reading more than one evaluation interval from the fraction
asked for is listed under ``warnings`` (and printed by the command).

Views (each printed when the runs hold what it needs):

* **runs**: one row per run and fraction: lower copy, upper entropy, upper logit, logit ratio,
  sigma_1 of the upper W_Q^T W_K, its displacement from initialisation, upper and first-upper
  FFN write RMS, the release step, the final perplexity (or "stopped" / "running").
* **pairs** (Tables 3, 4, 6, 7, 9, 10): runs grouped by the directory they were found in (the
  table, or its architecture pair; a run linked in from another table belongs to the table it
  is linked into, under the arm its link names, see :mod:`megatron_qk.rundir.finder`); every
  arm against the group's ``control`` arm (paired by seed, averaged over seeds): final ppl, ppl
  reduction (control minus arm), final loss difference, and the arm's readouts, one table per
  ``--at``.
* **relative** (Table 5, Appendix C, Section 5.6): within a group, the upper and
  first-upper FFN write RMS reduction of each run relative to each other run, ``1 - x / ref``.
* ``--figure2 PNG``: per group, the ppl reduction against the control's upper entropy at the
  first ``--at`` (Figure 2, right) and the reductions as bars (left); drawn by
  :mod:`megatron_qk.analysis.figure2`.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import yaml

from megatron_qk.rundir import finder
from megatron_qk.rundir.layout import METRICS_FILE
from megatron_qk.rundir.runlog import RunLog

# (diag field, column header).
COLUMNS = (
    ("lower_copy", "lower copy"),
    ("upper_entropy", "upper entropy"),
    ("upper_logit", "upper logit RMS"),
    ("upper_logit_abs", "upper logit mean |z|"),
    ("logit_ratio", "logit ratio"),
    ("upper_qk_sigma", "sigma_1"),
    ("upper_qk_displacement", "displacement"),
    ("upper_ffn_write_rms", "upper FFN write"),
    ("first_upper_ffn_write_rms", "first-upper FFN write"),
)
CONTROL_ARM = "control"


class ReadoutError(ValueError):
    """A run directory cannot be read (the message names it)."""


def find_runs(paths: list[str]) -> list[Path]:
    """Run directories given or found below the given paths (links followed, each run once).

    Through :func:`megatron_qk.rundir.finder.find_runs`, in the order the paths are given.
    """
    try:
        return [run.path for run in finder.find_runs(paths)]
    except finder.RunFinderError as exc:
        raise ReadoutError(str(exc)) from None


def load_readout_run(run_dir: Path) -> dict:
    """Config facts, diag lines, releases and the summary of one run directory."""
    log = RunLog(run_dir)
    if not log.config_path.is_file():
        raise ReadoutError(f"{run_dir}: no config.yaml")
    if not log.has_metrics():
        raise ReadoutError(f"{run_dir}: no {METRICS_FILE}")
    cfg = yaml.safe_load(log.config_path.read_text(encoding="utf-8")) or {}
    try:
        diags = log.diags
    except ValueError as exc:
        raise ReadoutError(str(exc)) from None
    if not diags:
        raise ReadoutError(f"{log.metrics_path}: no diag lines (diagnostics disabled?)")
    planned = _planned_steps(diags, run_dir)
    releases = {}
    for r in log.releases:  # a rule released twice (a replayed log): its first release
        releases.setdefault(r["rule"], {"step": r["step"], "frac": r["frac"]})
    evals = log.evals
    seed = (cfg.get("training") or {}).get("seed")
    return {
        "path": str(run_dir),
        # The directory the run was reached in: runs pair within one table directory, so a
        # control linked in from another table is this table's control.
        "name": str(Path(run_dir).parent),
        "arm": finder.run_label(run_dir, cfg.get("arm", "?"), seed),
        "seed": seed,
        "planned_steps": planned,
        "diags": diags,
        "releases": releases,
        "summary": log.summary(),
        "last_eval": evals[-1] if evals else None,
    }


def _planned_steps(diags: list[dict], run_dir: Path) -> int:
    for d in diags:
        if d.get("frac"):
            return round(d["step"] / d["frac"])
    raise ReadoutError(f"{run_dir}: cannot tell the planned steps (no diag after step 0)")


def eval_gap(run: dict) -> int:
    """The run's evaluation interval: the smallest step between two of its ``diag`` lines."""
    steps = sorted({d["step"] for d in run["diags"]})
    return min((b - a for a, b in zip(steps, steps[1:])), default=0)


def diag_at(run: dict, frac: float) -> dict | None:
    """The diag line nearest to ``frac`` of the planned steps (earlier on a tie).

    None when the run's log ends more than half an evaluation interval before that point (a run
    stopped or still running before it).
    """
    target = frac * run["planned_steps"]
    diags = run["diags"]
    best = min(diags, key=lambda d: (abs(d["step"] - target), d["step"]))
    if best["step"] < target - eval_gap(run) / 2 - 1e-9:
        return None
    return best


def far_reading(run: dict, frac: float, diag: dict | None) -> str | None:
    """A warning when the diag line read for ``frac`` lies more than one evaluation interval
    from it (e.g. ``--at 0.2`` of a run that evaluated only at step 0), else None."""
    if diag is None:
        return None
    target = frac * run["planned_steps"]
    gap = eval_gap(run)
    if abs(diag["step"] - target) <= max(gap, 1) + 1e-9:
        return None
    return (
        f"{run['path']}: --at {100 * frac:g}% reads the evaluation at step {diag['step']} "
        f"({100 * diag['step'] / run['planned_steps']:.2f}%), {abs(diag['step'] - target):.0f} "
        f"steps away: more than one evaluation interval ({gap} steps)"
    )


def final_state(run: dict) -> str:
    """finished / stopped / running, from summary.json."""
    s = run["summary"]
    if s is None:
        return "running"
    if s.get("finished"):
        return "finished"
    return "stopped" if s.get("stopped") else "running"


def run_rows(runs: list[dict], fracs: list[float]) -> list[dict]:
    """The runs view as data: one row per run and fraction."""
    rows = []
    for run in runs:
        release = next(iter(run["releases"].values()), None)
        s = run["summary"] or {}
        for frac in fracs:
            d = diag_at(run, frac)
            row = {
                "run": run["path"],
                "name": run["name"],
                "arm": run["arm"],
                "seed": run["seed"],
                "at": frac,
                "step": None if d is None else d["step"],
                "frac": None if d is None else d["step"] / run["planned_steps"],
                "release_step": None if release is None else release["step"],
                "release_frac": None if release is None else release["frac"],
                "final_val_ppl": s.get("final_val_ppl") if s.get("finished") else None,
                "final_val_loss": s.get("final_val_loss") if s.get("finished") else None,
                "state": final_state(run),
            }
            for key, _ in COLUMNS:
                row[key] = None if d is None else d.get(key)
            rows.append(row)
    return rows


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def pair_rows(rows: list[dict], at: float) -> list[dict]:
    """Every arm against its group's control (seed-paired, averaged over seeds) at ``at``.

    The ``name`` of a row is its group: the directory its runs were found in.
    """
    by_group: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["at"] == at:
            by_group.setdefault(r["name"], {}).setdefault(r["arm"], {})[r["seed"]] = r
    out = []
    for name, arms in sorted(by_group.items()):
        control = arms.get(CONTROL_ARM)
        if control is None:
            continue
        for arm, runs in sorted(arms.items()):
            seeds = sorted(s for s in runs if s in control)
            done = [
                s
                for s in seeds
                if None not in (runs[s]["final_val_ppl"], control[s]["final_val_ppl"])
            ]
            row = {
                "name": name,
                "at": at,
                "arm": arm,
                "seeds": seeds,
                "control_ppl": _mean([control[s]["final_val_ppl"] for s in done]),
                "final_ppl": _mean([runs[s]["final_val_ppl"] for s in done]),
                "ppl_reduction": _mean(
                    [control[s]["final_val_ppl"] - runs[s]["final_val_ppl"] for s in done]
                ),
                "loss_difference": _mean(
                    [runs[s]["final_val_loss"] - control[s]["final_val_loss"] for s in done]
                ),
                "release_frac": _mean(
                    [runs[s]["release_frac"] for s in seeds if runs[s]["release_frac"] is not None]
                ),
            }
            for key, _ in COLUMNS:
                values = [runs[s][key] for s in seeds if runs[s][key] is not None]
                row[key] = _mean(values)
            out.append(row)
    return out


def relative_rows(rows: list[dict], at: float) -> list[dict]:
    """FFN-write reductions ``1 - x / ref`` between the runs of each name group (same seed)."""
    out = []
    group = [r for r in rows if r["at"] == at and r["upper_ffn_write_rms"] is not None]
    for r in group:
        for ref in group:
            if ref is r or ref["name"] != r["name"] or ref["seed"] != r["seed"]:
                continue
            out.append(
                {
                    "name": r["name"],
                    "arm": r["arm"],
                    "reference": ref["arm"],
                    "seed": r["seed"],
                    "upper_ffn_write_reduction": 1
                    - r["upper_ffn_write_rms"] / ref["upper_ffn_write_rms"],
                    "first_upper_ffn_write_reduction": 1
                    - r["first_upper_ffn_write_rms"] / ref["first_upper_ffn_write_rms"],
                }
            )
    return out


def readout(paths: list[str], fracs: list[float]) -> dict:
    """The whole command as data (see the module docstring).

    ``pairs`` holds the against-the-control rows of every fraction (each with its ``at``);
    ``warnings`` the readings more than one evaluation interval from the fraction asked for.
    """
    runs = [load_readout_run(p) for p in find_runs(paths)]
    rows = run_rows(runs, fracs)
    warnings = [
        w for run in runs for f in fracs if (w := far_reading(run, f, diag_at(run, f))) is not None
    ]
    return {
        "at": fracs,
        "runs": rows,
        "pairs": [p for f in fracs for p in pair_rows(rows, f)],
        "relative": relative_rows(rows, fracs[0]),
        "warnings": warnings,
    }


# ------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def format_report(result: dict) -> str:
    """Markdown tables of the three views."""
    lines = ["## Readouts", ""]
    head = ["run", "arm", "seed", "at", "read at step"] + [h for _, h in COLUMNS]
    head += ["release", "final ppl"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        read = "n/a" if r["step"] is None else f"{r['step']} ({_pct(r['frac'])})"
        release = (
            "none"
            if r["release_step"] is None
            else f"{r['release_step']} ({_pct(r['release_frac'])})"
        )
        final = _fmt(r["final_val_ppl"]) if r["state"] == "finished" else r["state"]
        cells = [r["run"], r["arm"], _fmt(r["seed"]), _pct(r["at"]), read]
        cells += [_fmt(r[k]) for k, _ in COLUMNS] + [release, final]
        lines.append("| " + " | ".join(cells) + " |")
    at = _pct(result["at"][0])
    for frac in result["at"]:
        pairs = [p for p in result["pairs"] if p.get("at", frac) == frac]
        if not pairs:
            continue
        here = _pct(frac)
        lines += ["", f"## Against the control (readouts @{here})", ""]
        head = ["group", "arm", "seeds", "final ppl", "PPL reduction", "Δ loss", "release"]
        head += [f"{h} @{here}" for k, h in COLUMNS if k != "first_upper_ffn_write_rms"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in pairs:
            cells = [p["name"], p["arm"], " ".join(map(str, p["seeds"])), _fmt(p["final_ppl"])]
            cells += [_fmt(p["ppl_reduction"]), _fmt(p["loss_difference"]), _pct(p["release_frac"])]
            cells += [_fmt(p[k]) for k, _ in COLUMNS if k != "first_upper_ffn_write_rms"]
            lines.append("| " + " | ".join(cells) + " |")
    if result["relative"]:
        lines += ["", f"## FFN write reduction relative to another run (@{at})", ""]
        lines += [
            "| group | run | relative to | seed | upper FFN write | first-upper FFN write |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["relative"]:
            lines.append(
                f"| {r['name']} | {r['arm']} | {r['reference']} | {r['seed']} | "
                f"{_pct(r['upper_ffn_write_reduction'])} | "
                f"{_pct(r['first_upper_ffn_write_reduction'])} |"
            )
    return "\n".join(lines)
