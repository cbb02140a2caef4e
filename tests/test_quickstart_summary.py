"""The report's opening summary reads each paper signature off the runs' own numbers."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_qk.config.loader import dump_config, load_config
from megatron_qk.config.optim import MultiplierRuleConfig
from megatron_qk.quickstart_summary import signature_lines

RULE = MultiplierRuleConfig(threshold_mode="over_uniform", threshold_ratio=1.3)
RULE_SET = "optim.rules=[{name: upper_qk, threshold_mode: over_uniform, threshold_ratio: 1.3}]"


def _run(root: Path, arm: str, diag: list[tuple], ablation_qk: float, release=None) -> Path:
    """A run directory: config, diag lines (step, lower_copy, upper_entropy, upper_logit)."""
    run_dir = root / arm
    run_dir.mkdir()
    sets = ["training.train_steps=100", f"arm={arm}"]
    if arm == "intervention":
        sets.append(RULE_SET)
    (run_dir / "config.yaml").write_text(dump_config(load_config("tiny", sets)))
    lines = []
    for step, copy, entropy, logit in diag:
        lines.append(
            {
                "kind": "diag",
                "step": step,
                "frac": step / 100,
                "tokens": step * 512,
                "lower_copy": copy,
                "lower_copy_uniform": 0.02,
                "upper_entropy": entropy,
                "upper_logit": logit,
            }
        )
    if release is not None:
        lines.append({"kind": "release", "rule": "upper_qk", **release})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = {"step": 5, "frac": 0.05, "ablation": {"qk": {"ppl_increase": ablation_qk}}}
    (run_dir / "diagnose.json").write_text(json.dumps({"results": [result]}))
    return run_dir


def test_signatures_appear_and_fail_by_the_numbers(tmp_path):
    # Control: upper entropy 0.4 (< 0.5 sharp threshold) at step 4, copy ratio 1.5 only at 10.
    control = [(0, 0.02, 1.0, 0.1), (3, 0.02, 0.8, 2.0), (4, 0.02, 0.4, 6.0), (10, 0.03, 0.3, 7.0)]
    interv = [(0, 0.02, 1.0, 0.1), (3, 0.02, 0.9, 1.0), (6, 0.03, 0.8, 2.0), (8, 0.03, 0.7, 2.5)]
    release = {"reason": "maturity", "step": 8, "frac": 0.08, "score": 1.5, "threshold": 1.3}
    dirs = {
        "control": _run(tmp_path, "control", control, ablation_qk=5.0),
        "intervention": _run(tmp_path, "intervention", interv, ablation_qk=0.5),
    }
    summaries = {
        "control": {
            "release": {},
            "sharp_entropy_crossing": {"step": 4, "frac": 0.04},
            "final_val_loss": 5.0,
        },
        "intervention": {
            "release": {"upper_qk": release},
            "sharp_entropy_crossing": None,
            "final_val_loss": 5.1,
        },
    }
    text = "\n".join(signature_lines(dirs, summaries, RULE))
    assert "4 of 5 signatures appeared" in text
    assert "**appeared**: a real maturity release: lower_copy / lower_copy_uniform 1.000" in text
    assert "reason `maturity`" in text
    assert "at step 4; lower_copy / lower_copy_uniform >= 1.3 at step 10" in text
    assert "upper entropy 0.8000 vs 0.9000" in text  # nearest 3%: step 3
    assert "+5.000 vs +0.500 ppl" in text  # signed: a negative cost reads -0.095
    assert "**did not appear**: lower final validation loss" in text and "+0.1000" in text
    # A forced release is not a maturity event, and a release already mature at step 0 neither.
    summaries["intervention"]["release"]["upper_qk"] = dict(release, reason="forced")
    text = "\n".join(signature_lines(dirs, summaries, RULE))
    assert "**did not appear**: a real maturity release" in text
    assert "3 of 5 signatures appeared" in text


def test_plot_draws_the_relative_threshold_on_the_lower_copy_axis(tmp_path):
    from megatron_qk.analysis.plot import load_run_curves

    run_dir = _run(tmp_path, "intervention", [(0, 0.02, 1.0, 0.1)], ablation_qk=0.0)
    assert load_run_curves(run_dir).maturity_threshold == 1.3 * 0.02  # ratio x the uniform baseline
    control = _run(tmp_path, "control", [(0, 0.02, 1.0, 0.1)], ablation_qk=0.0)
    assert load_run_curves(control).maturity_threshold is None
