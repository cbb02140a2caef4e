"""Figure-3-style mechanism panels as PNG (``megatron-qk plot RUN_DIR [...] --out DIR``).

Panels (runs overlaid, colour by arm, line style by seed; the drawing is in
:mod:`megatron_qk.analysis.plot_panels`):

* ``lower_copy``: lower-half copy-routing score, its chance level (uniform causal attention on
  the same positions) and the maturity threshold.
* ``upper_entropy``: upper-half normalised attention entropy, the sharp-entropy threshold and
  each run's crossing.
* ``upper_logit``: upper-half attention logit RMS.
* ``qk_sigma``: mean top singular value of the upper heads' ``W_Q^T W_K``.
* ``ablation``: perplexity increase when upper-half Q/K are zeroed, over checkpoints, with its
  standard error over held-out sequences (from ``RUN_DIR/diagnose.json``, written by
  ``megatron-qk diagnose --all-checkpoints``).
* ``val_loss``: validation loss against training tokens (the ``eval`` lines).

Every panel marks each run's releases (from its ``release`` lines). Each panel is written as
``panel_<name>.png`` and all together as ``figure3.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_qk.analysis.plot_panels import draw_panel, pyplot, run_styles
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
    "val_loss": "F. Validation loss",
}


@dataclass
class RunCurves:
    """What the panels need from one run directory."""

    path: Path
    arm: str
    seed: int
    diag: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    releases: list[dict] = field(default_factory=list)
    crossing: dict | None = None
    maturity_threshold: float | None = None
    maturity_label: str | None = None
    sharp_threshold: float | None = None
    eval_sequences: int | None = None
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
    run.eval_sequences = cfg.training.eval_iters * cfg.training.global_batch_size
    maturity = [r for r in cfg.optim.rules if r.release == "maturity"]
    if maturity:
        run.maturity_threshold = maturity[0].threshold
        run.maturity_label = f"maturity threshold ({maturity[0].threshold:g})"
    run.diag = log.diags
    run.evals = log.evals
    run.releases = log.releases
    run.crossing = log.event("sharp_entropy_crossing")
    diagnose = path / DIAGNOSE_FILE
    if diagnose.exists():
        run.ablation = json.loads(diagnose.read_text(encoding="utf-8")).get("results", [])
    if maturity and maturity[0].threshold_mode == "over_uniform":
        # The rule compares lower_copy / lower_copy_uniform with the ratio; on the lower-copy
        # axis that is the ratio times the baseline (fixed held-out positions: one value).
        ratio = maturity[0].threshold_ratio
        bases = [r["lower_copy_uniform"] for r in run.diag if r.get("lower_copy_uniform")]
        run.maturity_threshold = ratio * bases[0] if bases else None
        run.maturity_label = f"maturity threshold ({ratio:g}x chance)"
    return run


def draw_figure(runs: list[RunCurves], names=None, panel_size=(5.0, 3.8)):
    """One matplotlib figure holding the panels ``names`` (default: all) in a grid.

    Returns:
        ``(figure, {panel name: axes})``; the caller saves and closes the figure.
    """
    plt = pyplot()
    names = list(PANELS if names is None else names)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False
    )
    styles = run_styles(runs)
    by_name = {}
    for ax, name in zip(axes.flat, names):
        draw_panel(ax, name, PANELS[name], runs, styles)
        by_name[name] = ax
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig, by_name


def plot_runs(run_dirs: list[Path], out_dir: Path) -> dict[str, Path]:
    """Draw every panel for ``run_dirs`` into ``out_dir``.

    Returns:
        ``{panel name: PNG path}`` plus ``"figure3"`` for the combined figure.
    """
    plt = pyplot()
    try:  # run directories or directories holding them, links followed, each run once
        found = [r.path for r in find_runs(run_dirs)]
    except RunFinderError as exc:
        raise FileNotFoundError(str(exc)) from None
    runs = [load_run_curves(p) for p in found]
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name in PANELS:
        fig, _ = draw_figure(runs, [name], panel_size=(5.6, 4.2))
        path = out_dir / f"panel_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[name] = path
    fig, _ = draw_figure(runs)
    path = out_dir / "figure3.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written["figure3"] = path
    return written
