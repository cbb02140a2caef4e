"""Figure-3-style mechanism panels as PNG (``megatron-qk plot RUN_DIR [...] --out DIR``).

Panels (x axis: fraction of planned training; runs overlaid, colour by arm, line style by seed):

* ``lower_copy``: lower-half copy-routing score, the maturity threshold, and each run's release
  point (from its ``release`` lines) marked.
* ``upper_entropy``: upper-half normalised attention entropy, the sharp-entropy threshold and
  each run's crossing marked.
* ``upper_logit``: upper-half attention logit RMS.
* ``qk_sigma``: mean top singular value of the upper heads' ``W_Q^T W_K``.
* ``ablation``: perplexity increase when upper-half Q/K are zeroed, over checkpoints (from
  ``RUN_DIR/diagnose.json``, written by ``megatron-qk diagnose --all-checkpoints``).

Each panel is written as ``panel_<name>.png`` and all together as ``figure3.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_qk.config.loader import load_resolved_config
from megatron_qk.rundir.finder import RunFinderError, find_runs, run_label
from megatron_qk.rundir.layout import DIAGNOSE_FILE, METRICS_FILE
from megatron_qk.rundir.runlog import RunLog

PANELS = {
    "lower_copy": "A. Lower routing maturity (copy score)",
    "upper_entropy": "B. Upper attention entropy",
    "upper_logit": "C. Upper attention logit RMS",
    "qk_sigma": "D. Upper $W_Q^T W_K$ top singular value",
    "ablation": "E. Ppl increase, upper Q/K zeroed",
}
_STYLES = ("-", "--", ":", "-.")


@dataclass
class RunCurves:
    """What the panels need from one run directory."""

    path: Path
    arm: str
    seed: int
    diag: list[dict] = field(default_factory=list)
    releases: list[dict] = field(default_factory=list)
    crossing: dict | None = None
    maturity_threshold: float | None = None
    sharp_threshold: float | None = None
    ablation: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Legend label."""
        return f"{self.arm} (seed {self.seed})"


def load_run_curves(path: Path) -> RunCurves:
    """What the panels need from a run directory: its config, log and diagnose results.

    Raises:
        FileNotFoundError: when the directory has no metrics.jsonl.
    """
    log = RunLog(path)
    if not log.has_metrics():
        raise FileNotFoundError(f"{path} is not a run directory: {path / METRICS_FILE} is missing")
    cfg = load_resolved_config(log.config_path)
    # A run linked in from another table is the arm its link names (rundir/finder.py).
    run = RunCurves(path, run_label(path, cfg.arm, cfg.training.seed), cfg.training.seed)
    run.sharp_threshold = cfg.diagnostics.sharp_entropy_threshold
    maturity = [r for r in cfg.optim.rules if r.release == "maturity"]
    if maturity:
        run.maturity_threshold = maturity[0].threshold
    run.diag = log.diags
    run.releases = log.releases
    run.crossing = log.event("sharp_entropy_crossing")
    diagnose = path / DIAGNOSE_FILE
    if diagnose.exists():
        run.ablation = json.loads(diagnose.read_text(encoding="utf-8")).get("results", [])
    if maturity and maturity[0].threshold_mode == "over_uniform":
        # The rule compares lower_copy / lower_copy_uniform with the ratio; on the lower-copy
        # axis that is the ratio times the baseline (fixed held-out positions: one value).
        bases = [r["lower_copy_uniform"] for r in run.diag if r.get("lower_copy_uniform")]
        run.maturity_threshold = maturity[0].threshold_ratio * bases[0] if bases else None
    return run


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        value = rec.get(key)
        if isinstance(value, int | float):
            xs.append(rec["frac"])
            ys.append(value)
    return xs, ys


def _draw_panel(ax, name: str, runs: list[RunCurves], colours: dict, styles: dict) -> None:
    ax.set_title(PANELS[name], fontsize=10)
    ax.set_xlabel("fraction of training")
    ax.grid(alpha=0.3)
    drew = False
    for run in runs:
        colour, style = colours[run.arm], styles[run.seed]
        if name == "ablation":
            xs = [r["frac"] for r in run.ablation]
            ys = [r["ablation"]["qk"]["ppl_increase"] for r in run.ablation]
        elif name == "qk_sigma":
            xs, ys = _series(run.diag, "upper_qk_sigma")
        else:
            xs, ys = _series(run.diag, name)
        if not xs:
            continue
        drew = True
        ax.plot(xs, ys, style, color=colour, marker=".", label=run.label)
        if name == "lower_copy":
            for rel in run.releases:
                ax.axvline(rel["frac"], color=colour, linestyle=style, alpha=0.6)
                ax.annotate(f"release ({rel['reason']})", (rel["frac"], max(ys)), fontsize=7)
            if run.maturity_threshold is not None:
                ax.axhline(run.maturity_threshold, color="grey", linestyle=":", linewidth=1)
        if name == "upper_entropy":
            if run.sharp_threshold is not None:
                ax.axhline(run.sharp_threshold, color="grey", linestyle=":", linewidth=1)
            if run.crossing is not None:
                ax.plot(
                    run.crossing["frac"], run.crossing["upper_entropy"], "x", color=colour, ms=9
                )
    if not drew:
        hint = (
            "run `megatron-qk diagnose --checkpoint RUN_DIR --all-checkpoints`"
            if name == "ablation"
            else "no diag lines (diagnostics.enabled: false?)"
        )
        ax.text(0.5, 0.5, f"no data:\n{hint}", ha="center", va="center", fontsize=8,
                transform=ax.transAxes)  # fmt: skip
    else:
        ax.legend(fontsize=7)


def plot_runs(run_dirs: list[Path], out_dir: Path) -> dict[str, Path]:
    """Draw every panel for ``run_dirs`` into ``out_dir``.

    Returns:
        ``{panel name: PNG path}`` plus ``"figure3"`` for the combined figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:  # run directories or directories holding them, links followed, each run once
        found = [r.path for r in find_runs(run_dirs)]
    except RunFinderError as exc:
        raise FileNotFoundError(str(exc)) from None
    runs = [load_run_curves(p) for p in found]
    arms = sorted({r.arm for r in runs})
    seeds = sorted({r.seed for r in runs})
    cmap = plt.get_cmap("tab10")
    colours = {arm: cmap(i % 10) for i, arm in enumerate(arms)}
    styles = {seed: _STYLES[i % len(_STYLES)] for i, seed in enumerate(seeds)}
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name in PANELS:
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
        _draw_panel(ax, name, runs, colours, styles)
        fig.tight_layout()
        path = out_dir / f"panel_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written[name] = path
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.8), dpi=100)
    for ax, name in zip(axes, PANELS):
        _draw_panel(ax, name, runs, colours, styles)
    fig.tight_layout()
    path = out_dir / "figure3.png"
    fig.savefig(path)
    plt.close(fig)
    written["figure3"] = path
    return written
