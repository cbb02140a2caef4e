"""The report's opening summary reads each paper signature off the runs' own numbers and sets it
against a yardstick: appeared / within noise / absent."""

from __future__ import annotations

import math
import statistics

import pytest
from figure_runs import write_run

from megatron_qk.config.optim import MultiplierRuleConfig
from megatron_qk.quickstart_eval import loss_with_se, paired_difference, summarize
from megatron_qk.quickstart_summary import (
    ABSENT,
    APPEARED,
    NOISE,
    UNMEASURED,
    judge,
    signature_lines,
    signatures,
)

RULE = MultiplierRuleConfig(threshold_mode="over_uniform", threshold_ratio=1.3)
RELEASE = {"reason": "maturity", "step": 8, "frac": 0.08, "score": 1.5, "threshold": 1.3}


def _final(diff: float, se: float) -> dict:
    arm = {"step": 100, "loss": 5.0, "loss_se": 0.05, "ppl": math.exp(5.0)}
    return {
        "sequences": 215,
        "tokens": 27520,
        "arms": {"control": arm, "intervention": dict(arm, loss=5.0 + diff)},
        "differences": {"intervention": {"loss": diff, "se": se}},
    }


def _setup(tmp_path, control_diag, interv_diag, control_abl, interv_abl, crossing_step=4):
    dirs = {
        "control": write_run(tmp_path, "control", control_diag, ablation=control_abl),
        "intervention": write_run(
            tmp_path, "intervention", interv_diag, ablation=interv_abl, release=RELEASE
        ),
    }
    crossing = None if crossing_step is None else {"step": crossing_step, "frac": 0.04}
    summaries = {
        "control": {"release": {}, "sharp_entropy_crossing": crossing, "planned_steps": 100},
        "intervention": {
            "release": {"upper_qk": dict(RELEASE)},
            "sharp_entropy_crossing": None,
            "planned_steps": 100,
        },
    }
    return dirs, summaries


# Control: upper entropy below 0.8 at step 4; copy ratio (copy / 0.02) >= 1.3 from step 12 on.
CONTROL = [
    (0, 0.02, 1.0, 0.1),
    (3, 0.02, 0.8, 2.0),
    (4, 0.02, 0.4, 6.0),
    *[(step, 0.02, 0.3, 7.0) for step in (6, 8)],
    *[(step, 0.03, 0.3, 7.0) for step in (12, 14, 16)],
]
INTERV = [(0, 0.02, 1.0, 0.1), (3, 0.02, 0.9, 1.0), (6, 0.03, 0.8, 2.0), (8, 0.03, 0.7, 2.5)]


def test_each_signature_against_its_yardstick(tmp_path):
    # Early window = up to the release (step 8): steps 5 and 8; step 20 (after) does not count.
    control_abl = [(5, 5.0, 1.0), (8, 3.0, 1.0), (20, -9.0, 0.1)]
    interv_abl = [(5, 0.5, 0.5), (8, 0.4, 0.5), (20, 9.0, 0.1)]
    dirs, summaries = _setup(tmp_path, CONTROL, INTERV, control_abl, interv_abl)
    found = {s.name.split(":")[0]: s for s in signatures(dirs, summaries, RULE, _final(-0.1, 0.01))}
    verdicts = [s.verdict for s in found.values()]
    assert verdicts == [APPEARED] * 5
    release = found["a real maturity release"]
    assert "lower_copy / lower_copy_uniform 1.000 at step 0" in release.numbers
    sharp = found["control"]
    assert "from step 12 (3 evaluations in a row)" in sharp.numbers
    assert "sharpened +3 evaluations earlier" in sharp.numbers
    # 3%: entropy 0.8 vs 0.9, logit 2.0 vs 1.0: far outside the mini study's seed sd.
    assert (
        "upper entropy 0.8000 vs 0.9000 (difference +0.1000)"
        in found["control's upper attention sharper at ~3%"].numbers
    )
    ablation = found["zeroing upper Q/K before the release costs the control more"]
    assert "2 checkpoint(s) up to step 8" in ablation.numbers and "step 20" not in ablation.numbers
    z = ((5.0 - 0.5) / math.hypot(1.0, 0.5) + (3.0 - 0.4) / math.hypot(1.0, 0.5)) / math.sqrt(2)
    assert f"combined z = {z:+.2f}" in ablation.numbers
    final = found["lower final validation loss under the intervention"]
    assert "difference -0.1000 ± 0.0100" in final.numbers and "reverse" not in final.numbers
    # Beyond the sampling noise of the split but inside the seed spread: said next to the verdict.
    small = signatures(dirs, summaries, RULE, _final(-0.011, 0.0026))[4]
    assert small.verdict == APPEARED and "so another seed could reverse it" in small.numbers
    assert "215 sequences (27,520 tokens)" in final.yardstick


def test_tiny_differences_are_within_noise_not_appeared(tmp_path):
    # The quickstart numbers: entropy 0.9997 vs 0.9998 at 3%, an ablation cost of
    # +10.7 ± 11.8 vs +0.3 ± 0.5, a final loss difference of -0.0035 with SE 0.004.
    control = [(0, 0.02, 1.0, 0.1), (3, 0.02, 0.9997, 0.101), *CONTROL[2:]]
    interv = [(0, 0.02, 1.0, 0.1), (3, 0.02, 0.9998, 0.100), *INTERV[2:]]
    dirs, summaries = _setup(tmp_path, control, interv, [(5, 10.7, 11.8)], [(5, 0.3, 0.5)])
    text = "\n".join(signature_lines(dirs, summaries, RULE, _final(-0.0035, 0.004)))
    assert "Of 5 signatures: 2 appeared, 3 within noise, 0 absent." in text
    assert "- **within noise**: control's upper attention sharper at ~3%" in text
    assert "- **within noise**: zeroing upper Q/K before the release" in text
    assert "- **within noise**: lower final validation loss under the intervention" in text
    assert text.count("*Yardstick:*") == 5


def test_reversed_and_missing_signatures(tmp_path):
    # Zeroing helped the control (-1.4 ± 0.3) and cost the intervention: the reverse. The
    # control never sharpens, the loss difference goes the wrong way, the release is forced.
    dirs, summaries = _setup(
        tmp_path, CONTROL, INTERV, [(5, -1.4, 0.3)], [(5, 0.5, 0.2)], crossing_step=None
    )
    summaries["intervention"]["release"]["upper_qk"]["reason"] = "forced"
    found = signatures(dirs, summaries, RULE, _final(+0.05, 0.01))
    assert [s.verdict for s in found] == [ABSENT, ABSENT, APPEARED, ABSENT, ABSENT]
    assert "upper entropy never fell below 0.8" in found[1].numbers
    # Without the whole-split evaluation the loss is not judged on the 16-sequence sample.
    assert signatures(dirs, summaries, RULE, None)[4].verdict == UNMEASURED


def test_sharpening_within_the_rules_patience_is_noise(tmp_path):
    # The copy ratio matures at step 6 (steps 6, 8, 12 at >= 1.3), the crossing is at step 4:
    # one evaluation apart, less than the rule's patience of 3.
    control = [(0, 0.02, 1.0, 0.1), (3, 0.02, 0.8, 2.0), (4, 0.02, 0.4, 6.0), (6, 0.03, 0.3, 7.0),
               (8, 0.03, 0.3, 7.0), (12, 0.03, 0.3, 7.0)]  # fmt: skip
    dirs, summaries = _setup(tmp_path, control, INTERV, [(5, 1.0, 1.0)], [(5, 1.0, 1.0)])
    sharp = signatures(dirs, summaries, RULE, None)[1]
    assert sharp.verdict == NOISE and "sharpened +1 evaluations earlier" in sharp.numbers


def test_judge_thresholds():
    assert judge(2.01, 1.0) == APPEARED and judge(-2.01, 1.0) == ABSENT
    assert judge(1.99, 1.0) == NOISE and judge(-1.99, 1.0) == NOISE
    assert judge(1.0, math.nan) == UNMEASURED


def test_losses_and_standard_errors_over_sequences():
    # Equal token counts: the loss is the mean of the per-sequence mean losses and its standard
    # error the sample sd over sequences / sqrt(N); the paired one is that of the differences.
    a = [5.0, 6.0, 5.5, 4.5]
    b = [5.2, 6.1, 5.4, 4.9]
    n = 128.0
    counts = [n] * 4
    loss, se = loss_with_se([x * n for x in a], counts)
    assert loss == pytest.approx(statistics.fmean(a))
    assert se == pytest.approx(statistics.stdev(a) / 2)
    diff, dse = paired_difference([x * n for x in a], [x * n for x in b], counts)
    d = [x - y for x, y in zip(a, b)]
    assert diff == pytest.approx(statistics.fmean(d)) and dse == pytest.approx(
        statistics.stdev(d) / 2
    )
    scores = {
        "control": {"step": 9, "sums": [x * n for x in b], "counts": counts},
        "intervention": {"step": 9, "sums": [x * n for x in a], "counts": counts},
    }
    out = summarize(scores)
    assert out["sequences"] == 4 and out["tokens"] == 512
    assert out["differences"]["intervention"]["loss"] == pytest.approx(statistics.fmean(d))
    assert out["arms"]["control"]["ppl"] == pytest.approx(math.exp(statistics.fmean(b)))
    with pytest.raises(ValueError, match="same sequences"):
        paired_difference([1.0], [1.0, 2.0], [1.0, 1.0])


def test_plot_draws_the_relative_threshold_on_the_lower_copy_axis(tmp_path):
    from megatron_qk.analysis.plot import load_run_curves

    run_dir = write_run(tmp_path, "intervention", [(0, 0.02, 1.0, 0.1)])
    assert load_run_curves(run_dir).maturity_threshold == 1.3 * 0.02  # ratio x the uniform baseline
    control = write_run(tmp_path, "control", [(0, 0.02, 1.0, 0.1)])
    assert load_run_curves(control).maturity_threshold is None
