"""``megatron-qk readout`` on real tiny runs, checked against their own diag lines by hand."""

import json
from pathlib import Path

import pytest

from megatron_qk.cli import main
from megatron_qk.config.loader import load_config
from megatron_qk.training.entry import train_from_config

COMMON = (
    "name=pair",
    "training.train_steps=10",
    "training.eval_interval=2",
    "training.eval_iters=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("readout")
    arms = {
        "control": (),
        "intervention": (
            "optim.rules=[{name: upper_qk, min_frac: 0.2, max_frac: 0.8, patience: 1}]",
        ),
        "stopped": ("training.stop_at_frac=0.4",),
    }
    for arm, extra in arms.items():
        cfg = load_config(
            "tiny", [*COMMON, f"arm={arm}", f"training.output_dir={root / arm}", *extra]
        )
        train_from_config(cfg)
    return root


def diags(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["kind"] == "diag"}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_readout_matches_the_diag_lines(runs, tmp_path, capsys):
    out = tmp_path / "readout.json"
    png = tmp_path / "fig2.png"
    args = ["readout", str(runs), "--at", "0.5", "--at", "0.9", "--json", str(out)]
    assert main([*args, "--figure2", str(png)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {(Path(r["run"]).name, r["at"]): r for r in data["runs"]}
    # 0.5 of 10 steps is step 5, between evaluations 4 and 6: the earlier one wins the tie.
    # 0.9 is step 9: evaluation 8 (distance 1) over 10.
    for arm, at, step in [("control", 0.5, 4), ("control", 0.9, 8), ("intervention", 0.5, 4)]:
        want = diags(runs / arm)[step]
        row = rows[(arm, at)]
        assert row["step"] == step and row["frac"] == pytest.approx(step / 10)
        for key in (
            "lower_copy",
            "upper_entropy",
            "upper_logit",
            "logit_ratio",
            "upper_qk_sigma",
            "upper_qk_displacement",
            "upper_ffn_write_rms",
            "first_upper_ffn_write_rms",
        ):
            assert row[key] == want[key], (arm, at, key)
    # The stopped run (4 of 10 steps) is readable at 0.5 (its last evaluation, step 4, is within
    # half an interval) and not at 0.9; it has no final perplexity.
    assert rows[("stopped", 0.5)]["step"] == 4 and rows[("stopped", 0.5)]["state"] == "stopped"
    assert rows[("stopped", 0.9)]["step"] is None
    assert rows[("stopped", 0.5)]["final_val_ppl"] is None
    # The release step is the run's release line.
    release = summary(runs / "intervention")["release"]["upper_qk"]
    assert rows[("intervention", 0.5)]["release_step"] == release["step"]
    # Pairs: the reduction is the control's final ppl minus the arm's.
    # "Against the control" is given at every --at; the group is the directory of the runs.
    assert sorted({p["at"] for p in data["pairs"]}) == [0.5, 0.9]
    assert {p["name"] for p in data["pairs"]} == {str(runs)}
    pairs = {p["arm"]: p for p in data["pairs"] if p["at"] == 0.5}
    late = {p["arm"]: p for p in data["pairs"] if p["at"] == 0.9}
    assert late["intervention"]["upper_entropy"] == diags(runs / "intervention")[8]["upper_entropy"]
    want = (
        summary(runs / "control")["final_val_ppl"] - summary(runs / "intervention")["final_val_ppl"]
    )
    assert pairs["intervention"]["ppl_reduction"] == pytest.approx(want, rel=1e-12)
    assert (
        pairs["intervention"]["upper_entropy"] == diags(runs / "intervention")[4]["upper_entropy"]
    )
    assert pairs["stopped"]["ppl_reduction"] is None
    # Relative FFN write: 1 - x / ref on the same readout step.
    rel = {(r["arm"], r["reference"]): r for r in data["relative"]}
    x = diags(runs / "stopped")[4]["upper_ffn_write_rms"]
    ref = diags(runs / "control")[4]["upper_ffn_write_rms"]
    assert rel[("stopped", "control")]["upper_ffn_write_reduction"] == pytest.approx(1 - x / ref)
    assert f"| {runs} | intervention |" in text and png.stat().st_size > 0
    assert "## Against the control (readouts @50.00%)" in text
    assert "## Against the control (readouts @90.00%)" in text


def test_readout_errors(tmp_path, capsys):
    assert main(["readout", str(tmp_path)]) == 2
    assert "no run directory (summary.json, config.yaml, metrics.jsonl)" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("arm: control\n")
    assert main(["readout", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
