"""Drawing of the Figure-3 panels (:mod:`megatron_qk.analysis.plot`) on matplotlib axes.

Every panel has its quantity and unit on the y axis, a legend naming each curve and each
reference line (chance level, thresholds, the sharp-entropy crossing), and a dashed vertical
line at each run's release with a label inside the axes. The ablation panel draws the standard
error over held-out sequences that ``diagnose`` records; the loss panel plots the ``eval`` lines
against training tokens.
"""

from __future__ import annotations

_STYLES = ("-", "--", ":", "-.")

#: y-axis label of each panel (quantity and unit).
Y_LABELS = {
    "lower_copy": "copy score (attention mass on the\nprevious occurrence, in [0, 1])",
    "upper_entropy": "normalised entropy\n(H / log #keys; 1 = uniform)",
    "upper_logit": "logit RMS (scaled q·k / √d_head)",
    "qk_sigma": r"$\sigma_1(W_Q^T W_K)$, mean over upper heads",
    "ablation": "Δ perplexity (ppl) ± SE\nover held-out sequences",
    "val_loss": "validation loss (nats / token)",
}
X_LABELS = {"val_loss": "training tokens"}
X_FRACTION = "fraction of planned training"
_DIAG_KEYS = {"qk_sigma": "upper_qk_sigma"}
_NO_DATA = {
    "ablation": "run `megatron-qk diagnose --checkpoint RUN_DIR --all-checkpoints`",
    "val_loss": "no eval lines",
}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib  # a heavy import, only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def token_formatter():
    """A tick formatter for token counts: ``40k``, ``1.5M``, ``2.5B``."""
    from matplotlib.ticker import FuncFormatter  # matplotlib: only when drawing

    def fmt(value: float, _pos) -> str:
        for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= scale:
                return f"{value / scale:g}{suffix}"
        return f"{value:g}"

    return FuncFormatter(fmt)


def run_styles(runs) -> dict:
    """``{id(run): (colour, line style)}``: colour by arm, line style by seed."""
    plt = pyplot()
    arms = sorted({r.arm for r in runs})
    seeds = sorted({r.seed for r in runs})
    cmap = plt.get_cmap("tab10")
    colours = {arm: cmap(i % 10) for i, arm in enumerate(arms)}
    styles = {seed: _STYLES[i % len(_STYLES)] for i, seed in enumerate(seeds)}
    return {id(r): (colours[r.arm], styles[r.seed]) for r in runs}


def _series(records: list[dict], key: str, x: str = "frac") -> tuple[list, list]:
    xs, ys = [], []
    for rec in records:
        value = rec.get(key)
        if isinstance(value, int | float):
            xs.append(rec[x])
            ys.append(value)
    return xs, ys


def _reference_line(ax, y: float, label: str, drawn: set, **style) -> None:
    """A horizontal reference line, drawn (and put in the legend) once per value and label."""
    key = (round(y, 12), label)
    if key in drawn:
        return
    drawn.add(key)
    ax.axhline(y, linewidth=1, label=f"{label} = {y:.4g}", **style)


def _mark_releases(ax, run, colour, style: str, x: str) -> None:
    """Each release of ``run``: a vertical line in the legend and a label inside the axes."""
    from matplotlib.transforms import blended_transform_factory  # matplotlib: only when drawing

    # x in data units, y in axes units: the text stays inside the panel whatever the data range.
    inside = blended_transform_factory(ax.transData, ax.transAxes)
    for rel in run.releases:
        where = rel.get(x)
        if where is None:
            continue
        ax.axvline(
            where,
            color=colour,
            linestyle=(0, (4, 2)),
            linewidth=1.2,
            alpha=0.8,
            label=f"release, {run.label}: step {rel['step']} ({rel['reason']})",
        )
        ax.text(
            where,
            0.97,
            f" release ({rel['reason']})",
            transform=inside,
            rotation=90,
            ha="left",
            va="top",
            fontsize=7,
            color=colour,
        )


def _draw_run(ax, name: str, run, colour, style: str, drawn: set) -> bool:
    """The curves of one run on panel ``name``; False when the run has no data for it."""
    x = "tokens" if name == "val_loss" else "frac"
    if name == "ablation":
        points = [(r["frac"], r["ablation"]["qk"]) for r in run.ablation]
        if not points:
            return False
        seqs = sorted({r["ablation"].get("sequences") for r in run.ablation} - {None})
        size = "" if not seqs else f", {'/'.join(map(str, seqs))} seq."
        ax.errorbar(
            [p for p, _ in points],
            [a["ppl_increase"] for _, a in points],
            yerr=[a.get("ppl_increase_se") or 0.0 for _, a in points],
            fmt=style,
            marker="o",
            ms=3,
            capsize=3,
            color=colour,
            label=f"{run.label}{size}",
        )
        _reference_line(ax, 0.0, "no effect", drawn, color="black", linestyle="-", alpha=0.4)
        _mark_releases(ax, run, colour, style, x)
        return True
    if name == "val_loss":
        xs, ys = _series(run.evals, "val_loss", x="tokens")
        size = "" if run.eval_sequences is None else f", {run.eval_sequences} seq. per eval"
        label = f"{run.label}{size}"
    else:
        xs, ys = _series(run.diag, _DIAG_KEYS.get(name, name))
        label = run.label
    if not xs:
        return False
    ax.plot(xs, ys, style, color=colour, marker=".", ms=4, label=label)
    if name == "lower_copy":
        chance = [r["lower_copy_uniform"] for r in run.diag if r.get("lower_copy_uniform")]
        if chance:
            _reference_line(
                ax, chance[0], "chance (uniform attention)", drawn, color="black", linestyle=":"
            )
        if run.maturity_threshold is not None:
            _reference_line(
                ax, run.maturity_threshold, run.maturity_label, drawn, color="grey", linestyle="-."
            )
    if name == "upper_entropy":
        if run.sharp_threshold is not None:
            _reference_line(
                ax,
                run.sharp_threshold,
                "sharp-entropy threshold",
                drawn,
                color="grey",
                linestyle="-.",
            )
        if run.crossing is not None:
            ax.plot(
                run.crossing["frac"],
                run.crossing["upper_entropy"],
                "X",
                color=colour,
                ms=9,
                linestyle="none",
                label=f"sharp-entropy crossing, {run.label}: step {run.crossing['step']}",
            )
    _mark_releases(ax, run, colour, style, x)
    return True


def draw_panel(ax, name: str, title: str, runs: list, styles: dict) -> None:
    """Draw panel ``name`` of ``runs`` on ``ax`` (``styles``: :func:`run_styles`)."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(X_LABELS.get(name, X_FRACTION))
    ax.set_ylabel(Y_LABELS[name], fontsize=9)
    if name == "val_loss":
        ax.xaxis.set_major_formatter(token_formatter())
    ax.grid(alpha=0.3)
    drawn: set = set()
    any_data = False
    for run in runs:
        colour, style = styles[id(run)]
        any_data |= _draw_run(ax, name, run, colour, style, drawn)
    if not any_data:
        hint = _NO_DATA.get(name, "no diag lines (diagnostics.enabled: false?)")
        ax.text(0.5, 0.5, f"no data:\n{hint}", ha="center", va="center", fontsize=8,
                transform=ax.transAxes)  # fmt: skip
        return
    ax.legend(fontsize=6.5, loc="best", framealpha=0.8)
