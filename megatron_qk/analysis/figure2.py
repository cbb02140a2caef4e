"""Figure 2 of ``megatron-qk readout --figure2 PNG``: the intervention's gain per recipe group.

Left: the perplexity reduction (control minus arm, final validation perplexity) of every
non-control arm as a bar; right: the same reduction against the control's early upper
attention entropy. Each point is the mean over the seeds paired with the control
(:func:`megatron_qk.analysis.readout.pair_rows` decides the pairing); its error bar is the sample
standard deviation over those seeds, and the label says how many seeds there are (one seed: no
error bar, and the label says so).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from megatron_qk.analysis.plot_panels import pyplot
from megatron_qk.analysis.readout import CONTROL_ARM, ReadoutError

Y_LABEL = "PPL reduction, control − arm (ppl)\nmean ± sd over seeds"


@dataclass
class Figure2Point:
    """One non-control arm of one recipe group."""

    name: str
    arm: str
    entropy: float
    reductions: list[float]

    @property
    def mean(self) -> float:
        """Mean reduction over the seeds."""
        return statistics.fmean(self.reductions)

    @property
    def sd(self) -> float:
        """Sample sd over the seeds (0 for a single seed, drawn as no error bar)."""
        return statistics.stdev(self.reductions) if len(self.reductions) > 1 else 0.0

    @property
    def label(self) -> str:
        """Tick / annotation label: the group (and the arm when not ``intervention``), n."""
        arm = "" if self.arm == "intervention" else f" / {self.arm}"
        n = len(self.reductions)
        # A group is the directory its runs were found in (readout.pair_rows): its last part
        # names it (runs/table3_components/gpt -> "gpt").
        group = Path(self.name).name or self.name
        return f"{group}{arm} (n={n} seed{'s' if n != 1 else ''})"


def figure2_points(result: dict) -> list[Figure2Point]:
    """Per-seed perplexity reductions of every paired arm of a ``readout`` result."""
    at = result["at"][0]
    final = {
        (r["name"], r["arm"], r["seed"]): r["final_val_ppl"]
        for r in result["runs"]
        if r["at"] == at and r["final_val_ppl"] is not None
    }
    pairs = [p for p in result["pairs"] if p.get("at", at) == at]  # one pair table per --at
    entropy = {p["name"]: p["upper_entropy"] for p in pairs if p["arm"] == CONTROL_ARM}
    points = []
    for p in pairs:
        if p["arm"] == CONTROL_ARM or entropy.get(p["name"]) is None:
            continue
        reductions = [
            final[(p["name"], CONTROL_ARM, s)] - final[(p["name"], p["arm"], s)]
            for s in p["seeds"]
            if (p["name"], CONTROL_ARM, s) in final and (p["name"], p["arm"], s) in final
        ]
        if reductions:
            points.append(Figure2Point(p["name"], p["arm"], entropy[p["name"]], reductions))
    return points


def draw_figure2(result: dict):
    """The Figure-2 matplotlib figure of a ``readout`` result.

    Returns:
        ``(figure, (left axes, right axes))``; the caller saves and closes the figure.

    Raises:
        ReadoutError: no finished control/arm pair with diag lines.
    """
    points = figure2_points(result)
    if not points:
        raise ReadoutError("--figure2 needs finished control/arm pairs with diag lines")
    plt = pyplot()
    at = result["at"][0]
    seeds = sorted({len(p.reductions) for p in points})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    xs = range(len(points))
    means, sds = [p.mean for p in points], [p.sd for p in points]
    left.bar(xs, means, yerr=sds, capsize=4, color="tab:blue", label="mean ± sd over seeds")
    left.set_xticks(list(xs), [p.label for p in points], rotation=30, ha="right", fontsize=8)
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_ylabel(Y_LABEL)
    left.set_title("Marginal value of early upper-Q/K slowing")
    left.legend(fontsize=8)
    right.errorbar(
        [p.entropy for p in points],
        means,
        yerr=sds,
        fmt="o",
        capsize=4,
        color="tab:red",
        label="mean ± sd over seeds",
    )
    for p in points:
        right.annotate(p.label, (p.entropy, p.mean), fontsize=7, xytext=(4, 4),
                       textcoords="offset points")  # fmt: skip
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xlabel(f"control upper attention entropy @{100 * at:g}% (H / log #keys; 1 = uniform)")
    right.set_ylabel(Y_LABEL)
    right.set_title("Gain vs early upper entropy")
    right.legend(fontsize=8)
    counts = "/".join(map(str, seeds))
    fig.suptitle(f"Figure 2: {len(points)} arm(s), {counts} seed(s) each", fontsize=10)
    fig.tight_layout()
    return fig, (left, right)


def figure2(result: dict, out: Path) -> int:
    """Write Figure 2 of a ``readout`` result to ``out`` (PNG).

    Returns:
        The number of arms plotted.
    """
    fig, _ = draw_figure2(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    pyplot().close(fig)
    return len(figure2_points(result))
