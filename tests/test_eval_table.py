"""The Table-2 view of ``megatron-qk eval`` reports: pairing by seed, deltas, mean row, errors."""

import json
import math
import statistics
from pathlib import Path

import pytest

from megatron_qk.analysis.eval_table import build_eval_table, eval_table, load_run_eval

U64 = 2.0**-53  # float64 unit roundoff


def naive_mean_abs(values: list[float]) -> float:
    """|sum(values) / n - statistics.mean (correctly rounded)|: n - 1 additions and a division on
    values <= max|v| round by <= U64 max|v| each, plus the other side's one rounding."""
    return (len(values) + 1) * U64 * max(abs(v) for v in values)


def naive_sd_abs(values: list[float]) -> float:
    """|eval_table's naive sample sd - statistics.stdev (exact up to its final rounding)|: each
    deviation v - m is off by the naive mean's error plus U64 |v - m|, which moves the sd by <=
    sqrt(n/(n-1)) times that; squares, n - 1 additions, division, sqrt: (n + 4) U64 relative."""
    n, sd = len(values), statistics.stdev(values)
    mean = sum(values) / n
    dev = naive_mean_abs(values) + U64 * max(abs(v - mean) for v in values)
    return math.sqrt(n / (n - 1)) * dev + (n + 4) * U64 * sd


CONTROL = {  # seed -> task -> acc
    1: {"piqa": 0.60, "lambada": 0.20, "mmlu": 0.230},
    2: {"piqa": 0.61, "lambada": 0.19, "mmlu": 0.229},
    3: {"piqa": 0.62, "lambada": 0.21, "mmlu": 0.231},
}
INTERVENTION = {
    1: {"piqa": 0.61, "lambada": 0.21, "mmlu": 0.233},
    2: {"piqa": 0.61, "lambada": 0.20, "mmlu": 0.228},
    3: {"piqa": 0.64, "lambada": 0.20},  # mmlu not scored: left out of the mean row
}


def report(arm: str, seed: int, step: int, tasks: dict) -> dict:
    return {
        "format": "megatron-qk-eval/1",
        "step": step,
        "arm": arm,
        "seed": seed,
        "tasks": {
            name: {"acc": acc, "acc_norm": acc + 0.01 if name == "piqa" else None, "samples": 10}
            for name, acc in tasks.items()
        },
    }


def make_run(root: Path, arm: str, seed: int, tasks: dict, summary: bool = True, step=100):
    run = root / f"{arm}-s{seed}"
    run.mkdir()
    data = report(arm, seed, step, tasks)
    if summary:  # summary.json is authoritative for arm and seed
        (run / "summary.json").write_text(json.dumps({"arm": arm, "seed": seed}))
        if seed == 3:
            del data["arm"], data["seed"]
    (run / "eval.json").write_text(json.dumps(data))
    return run


@pytest.fixture
def runs(tmp_path):
    dirs = [make_run(tmp_path, "control", s, t) for s, t in CONTROL.items()]
    dirs += [
        make_run(tmp_path, "intervention", s, t, summary=s != 2) for s, t in INTERVENTION.items()
    ]
    return dirs


def test_paired_table(runs, tmp_path):
    markdown, data = build_eval_table(runs)
    assert data["treatment_arm"] == "intervention" and data["seeds"] == [1, 2, 3]
    rows = {r["task"]: r for r in data["rows"]}
    assert list(rows) == ["piqa", "lambada", "mmlu"]  # the paper's row order
    for task in ("piqa", "lambada"):
        ctrl = [CONTROL[s][task] for s in (1, 2, 3)]
        trt = [INTERVENTION[s][task] for s in (1, 2, 3)]
        deltas = [(b - a) * 100 for a, b in zip(ctrl, trt)]
        row = rows[task]
        # The same floats on both sides (JSON round-trips them, the deltas are the same
        # expression): only eval_table's naive mean/sd differ from the exact statistics module.
        assert row["control"]["mean"] == pytest.approx(
            statistics.mean(ctrl), abs=naive_mean_abs(ctrl)
        )
        assert row["control"]["std"] == pytest.approx(
            statistics.stdev(ctrl), abs=naive_sd_abs(ctrl)
        )
        assert row["treatment"]["std"] == pytest.approx(
            statistics.stdev(trt), abs=naive_sd_abs(trt)
        )
        assert row["delta_pp"]["mean"] == pytest.approx(
            statistics.mean(deltas), abs=naive_mean_abs(deltas)
        )
        assert row["delta_pp"]["std"] == pytest.approx(
            statistics.stdev(deltas), abs=naive_sd_abs(deltas)
        )
        assert row["wins"] == sum(d > 0 for d in deltas)
    assert rows["mmlu"]["delta_pp"]["n"] == 2 and rows["mmlu"]["treatment"]["n"] == 2
    # Same differences d1, d2 both sides; (100 d1 + 100 d2) / 2 vs (d1 + d2) * 50: <= 4 roundings
    # (two products, two sums/products) of values <= 100 (|d1| + |d2|) each (the / 2 is exact).
    d1, d2 = 0.233 - 0.23, 0.228 - 0.229
    assert rows["mmlu"]["delta_pp"]["mean"] == pytest.approx(
        ((0.233 - 0.23) + (0.228 - 0.229)) * 50, abs=4 * U64 * 100 * (abs(d1) + abs(d2))
    )
    # Mean row: suite averages per seed over the tasks every paired run has, then paired.
    assert data["mean"]["tasks"] == ["piqa", "lambada"]
    per_seed = [
        (INTERVENTION[s]["piqa"] + INTERVENTION[s]["lambada"]) / 2
        - (CONTROL[s]["piqa"] + CONTROL[s]["lambada"]) / 2
        for s in (1, 2, 3)
    ]
    # eval_table scales each per-seed difference by 100 (one rounding, U64 |v| each) before its
    # naive mean/sd; the test scales the exact statistics once (U64 |result|).
    scaled = [100 * d for d in per_seed]
    shift = U64 * max(abs(v) for v in scaled)
    assert data["mean"]["delta_pp"]["mean"] == pytest.approx(
        100 * statistics.mean(per_seed), abs=naive_mean_abs(scaled) + 2 * shift
    )
    assert data["mean"]["delta_pp"]["std"] == pytest.approx(
        100 * statistics.stdev(per_seed), abs=naive_sd_abs(scaled) + 3 * shift
    )
    assert data["wins"] == 2 + 2 + 1 and data["comparisons"] == 8
    assert "| PIQA | 0.6100 ± 0.0100 | 0.6200 ± 0.0173 | +1.000 ± 1.000 |" in markdown
    assert "| Mean |" in markdown and "wins 5 of 8" in markdown
    assert "Mean row over the tasks every paired run has: piqa, lambada." in markdown
    # acc_norm where the task defines it, acc elsewhere (marked in the row label).
    markdown, data = build_eval_table(runs, metric="acc_norm")
    # acc + 0.01 in [0.5, 1): within 2 half-ulps (2^-54 each) of the decimal 0.61..0.63; the
    # 3-term sum (< 2) rounds twice (<= U64 each, / 3), the division and the literal once each
    # (2^-54): < 2.7 U64.
    assert data["rows"][0]["control"]["mean"] == pytest.approx(0.62, abs=4 * U64)
    assert "| LAMBADA (acc) |" in markdown and "| PIQA |" in markdown


def test_report_files_and_unpaired_runs(runs, tmp_path):
    run = runs[0]  # control seed 1
    # An older checkpoint's report is ignored; another report at the newest step is merged.
    older = report("control", 1, 50, {"piqa": 0.1, "race": 0.3})
    (run / "eval_iter_0000050.json").write_text(json.dumps(older))
    (run / "eval_race.json").write_text(json.dumps(report("control", 1, 100, {"race": 0.27})))
    loaded = load_run_eval(run)
    # Exact: JSON writes the shortest repr, which reads back as the same float.
    assert loaded.step == 100 and loaded.tasks["race"]["acc"] == 0.27
    assert loaded.tasks["piqa"]["acc"] == 0.60 and len(loaded.files) == 2
    extra = make_run(tmp_path, "control", 4, {"piqa": 0.5, "lambada": 0.1})
    (tmp_path / "not-evaluated").mkdir()
    markdown, data = build_eval_table([*runs, extra, tmp_path / "not-evaluated"])
    assert data["unpaired"] == [{"run_dir": str(extra), "arm": "control", "seed": 4}]
    assert data["skipped"] == [str(tmp_path / "not-evaluated")]
    piqa = data["rows"][0]
    assert piqa["control"]["n"] == 4 and piqa["delta_pp"]["n"] == 3
    assert [r["task"] for r in data["rows"]] == ["piqa", "lambada", "mmlu"]  # race: one arm only
    assert "Unpaired runs" in markdown and "control seed 4" in markdown
    # The same task scored twice at one step with different results is an error.
    (run / "eval_again.json").write_text(json.dumps(report("control", 1, 100, {"piqa": 0.7})))
    with pytest.raises(ValueError, match="different results"):
        load_run_eval(run)


def test_errors(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        build_eval_table([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="none of the run directories has eval"):
        build_eval_table([tmp_path / "empty"])
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "summary.json").write_text(json.dumps({"arm": "control", "seed": 2}))
    (twin / "eval.json").write_text(json.dumps(report("control", 2, 100, {"piqa": 0.5})))
    with pytest.raises(ValueError, match="two 'control' runs with seed 2"):
        build_eval_table([*runs, twin])
    third = make_run(tmp_path, "lr_half", 1, {"piqa": 0.5})
    with pytest.raises(ValueError, match="cannot choose the intervention arm"):
        build_eval_table([*runs, third])
    _, data = build_eval_table([*runs, third], treatment_arm="lr_half")
    # (0.5 - 0.60) is exact (Sterbenz) but 0.60 is stored within 2^-54: x 100 gives 100 * 2^-54
    # plus one rounding (U64 * 10); the mean of one value is exact.
    delta = data["rows"][0]["delta_pp"]["mean"]
    assert data["seeds"] == [1] and delta == pytest.approx(-10.0, abs=100 * 2.0**-54 + 10 * U64)
    # What `megatron-qk compare` calls: one table per arm against the control.
    markdown, data = eval_table([*runs, third], "control")
    assert list(data["tables"]) == ["intervention", "lr_half"]
    assert data["tables"]["intervention"] == build_eval_table(runs)[1]
    assert "Table 2): intervention vs control" in markdown and "lr_half vs control" in markdown
    with pytest.raises(ValueError, match="only the control arm"):
        eval_table(runs[:3], "control")
    bad = tmp_path / "control-s3" / "eval_notes.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="eval_notes.json: not a `megatron-qk eval` report"):
        build_eval_table(runs)
