"""The Figure-3 panels (``plot``, the quickstart report) and Figure 2 (``readout --figure2``) read
right: axis labels with units, a legend entry for every curve and reference line, the release in
every time panel, error bars where there are standard errors. Everything is read back from the
matplotlib objects, not from pixels."""

from __future__ import annotations

import statistics

import pytest
from figure_runs import write_run
from matplotlib.container import ErrorbarContainer

from megatron_qk.analysis.figure2 import draw_figure2
from megatron_qk.analysis.plot import PANELS, draw_figure, load_run_curves, plot_runs
from megatron_qk.analysis.plot_panels import pyplot
from megatron_qk.analysis.readout import readout

RELEASE = {"reason": "maturity", "step": 8, "frac": 0.08, "score": 1.5, "threshold": 1.3}
CROSSING = {"step": 6, "frac": 0.06, "tokens": 3072, "upper_entropy": 0.7}
DIAG = [(0, 0.02, 1.0, 0.1), (4, 0.02, 0.9, 1.0), (6, 0.03, 0.7, 2.0), (10, 0.03, 0.6, 2.5)]


@pytest.fixture
def runs(tmp_path):
    control = write_run(
        tmp_path, "control", DIAG, ablation=[(5, 4.0, 1.5), (10, 2.0, 0.5)], crossing=CROSSING
    )
    interv = write_run(
        tmp_path, "intervention", DIAG, ablation=[(5, 0.5, 0.25), (10, 1.0, 0.4)], release=RELEASE
    )
    yield [load_run_curves(control), load_run_curves(interv)], [control, interv]
    pyplot().close("all")


def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None, ax.get_title()
    return [t.get_text() for t in legend.get_texts()]


def test_every_panel_has_units_legends_and_the_release(runs):
    curves, _ = runs
    fig, axes = draw_figure(curves)
    assert list(axes) == list(PANELS) and "val_loss" in axes
    units = {
        "lower_copy": "attention mass",
        "upper_entropy": "1 = uniform",
        "upper_logit": "√d_head",
        "qk_sigma": "sigma_1(W_Q^T W_K)",
        "ablation": "± SE",
        "val_loss": "nats / token",
    }
    release = "release, intervention (seed 1): step 8 (maturity)"
    for name, ax in axes.items():
        assert units[name] in ax.get_ylabel(), name
        assert ax.get_xlabel() == ("training tokens" if name == "val_loss" else
                                   "fraction of planned training")  # fmt: skip
        texts = _legend(ax)
        assert "control (seed 1)" in " ".join(texts) and release in texts, name
        # The release line sits at the release: its fraction, or its tokens on the loss panel.
        x = 8 * 512 if name == "val_loss" else 0.08
        lines = [ln for ln in ax.get_lines() if ln.get_label() == release]
        assert len(lines) == 1 and list(lines[0].get_xdata()) == [x, x], name
    a = _legend(axes["lower_copy"])
    assert "chance (uniform attention) = 0.02" in a
    assert "maturity threshold (1.3x chance) = 0.026" in a
    b = _legend(axes["upper_entropy"])
    assert "sharp-entropy threshold = 0.8" in b
    assert "sharp-entropy crossing, control (seed 1): step 6" in b
    assert "intervention (seed 1), 16 seq. per eval" in _legend(axes["val_loss"])


def test_release_label_stays_inside_its_panel(runs):
    curves, _ = runs
    fig, axes = draw_figure(curves)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for name, ax in axes.items():
        box = ax.get_window_extent(renderer)
        labels = [t for t in ax.texts if t.get_text().strip() == "release (maturity)"]
        assert len(labels) == 1, name
        inner = labels[0].get_window_extent(renderer)
        assert box.x0 <= inner.x0 and inner.x1 <= box.x1 + 1, name
        assert box.y0 <= inner.y0 and inner.y1 <= box.y1 + 1, name  # not clipped at the top


def test_ablation_panel_draws_the_standard_errors(runs):
    curves, _ = runs
    _, axes = draw_figure(curves, ["ablation"])
    bars = [c for c in axes["ablation"].containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in bars] == [
        "control (seed 1), 64 seq.",
        "intervention (seed 1), 64 seq.",
    ]
    for container, ses in zip(bars, ([1.5, 0.5], [0.25, 0.4])):
        (segments,) = container.lines[2]
        heights = [seg[1][1] - seg[0][1] for seg in segments.get_segments()]
        assert heights == pytest.approx([2 * se for se in ses])


def test_plot_command_writes_the_loss_panel(runs, tmp_path):
    _, dirs = runs
    written = plot_runs(dirs, tmp_path / "figures")
    assert set(written) == {*PANELS, "figure3"}
    assert written["val_loss"].name == "panel_val_loss.png" and written["val_loss"].stat().st_size


def test_figure2_shows_the_seed_count_and_the_spread(tmp_path):
    ppl = {("control", 1): 300.0, ("control", 2): 310.0, ("intervention", 1): 290.0,
           ("intervention", 2): 306.0}  # fmt: skip
    for (arm, seed), final in ppl.items():  # one group: the directory "pair"
        write_run(tmp_path / "pair", arm, DIAG, seed=seed, final_ppl=final)
    result = readout([str(tmp_path)], [0.03])
    fig, (left, right) = draw_figure2(result)
    reductions = [300.0 - 290.0, 310.0 - 306.0]
    mean, sd = statistics.fmean(reductions), statistics.stdev(reductions)
    assert [t.get_text() for t in left.get_xticklabels()] == ["pair (n=2 seeds)"]
    assert [p.get_height() for p in left.patches] == pytest.approx([mean])
    for ax in (left, right):
        assert "mean ± sd over seeds" in ax.get_ylabel() and "(ppl)" in ax.get_ylabel()
        assert _legend(ax) == ["mean ± sd over seeds"]
        (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        (segments,) = bars.lines[2]
        (seg,) = segments.get_segments()
        assert seg[1][1] - seg[0][1] == pytest.approx(2 * sd)
    assert "1 = uniform" in right.get_xlabel()
    assert "2 seed(s) each" in fig.get_suptitle()
    pyplot().close(fig)
