"""``megatron-qk compare``: paired statistics, token saving and input errors on built run dirs."""

import json
import math
from pathlib import Path

import pytest

from megatron_qk.analysis import compare_load
from megatron_qk.analysis.compare import CompareError, tokens_to_target
from megatron_qk.analysis.compare_format import format_table
from megatron_qk.analysis.compare_load import load_and_compare
from megatron_qk.cli import compare as cli_compare
from megatron_qk.cli import main
from megatron_qk.config.loader import dump_config, load_config

STEPS, EVAL_EVERY = 8, 2
TOKENS_PER_STEP = 8 * 64  # tiny: global batch 8 x seq 64
BUDGET = STEPS * TOKENS_PER_STEP  # 4096
EVAL_TOKENS = [s * TOKENS_PER_STEP for s in range(0, STEPS + 1, EVAL_EVERY)]  # 0, 1024, ...
RULE = "optim.rules=[{name: upper_qk}]"

# Tolerances from float64 rounding (U64 = unit roundoff). The decimal losses below lie in [2, 4),
# so each is stored within half an ulp, 2^-52, of its decimal value; differences of two of them
# are exact (Sterbenz: within a factor 2), and statistics.fmean/stdev round only once at the end.
U64 = 2.0**-53
# Means, paired differences and deviations combine <= 4 input errors (<= 2^-50); the sd scales
# that by sqrt(n/(n-1)) <= 1.23, plus the final roundings of both sides: < 2^-48 ~ 3.6e-15, far
# below the 0.05-0.2 effects checked.
LOSS_ABS = 2.0**-48
# Interpolated tokens t0 + (l0 - target) / (l0 - l1) * 1024: numerator and denominator are each off
# by <= 2 * 2^-52 (inputs, exact subtraction), so the fraction by <= 4 * 2^-52 / (l0 - l1) + U64,
# smallest gap l0 - l1 = 0.1 here; times 1024 (exact), plus the final addition's U64 * 4096.
TOKENS_ABS = 1024 * (4 * 2.0**-52 / 0.1 + U64) + 4096 * U64  # ~1e-11, vs 512-token savings
# Savings 4096 - tokens are exact (Sterbenz); percent = 100 * saved / 4096 adds two roundings.
PERCENT_ABS = TOKENS_ABS * 100 / 4096 + 2 * U64 * 100

# Eval curves (val_loss at tokens 0, 1024, 2048, 3072, 4096) per seed.
CONTROL = {
    1: [6.0, 4.0, 3.5, 3.2, 3.0],
    2: [6.0, 4.1, 3.6, 3.3, 3.1],
    3: [6.0, 4.0, 3.4, 3.1, 2.9],
}
INTERVENTION = {
    1: [6.0, 3.9, 3.3, 2.9, 2.8],  # reaches 3.0 between 2048 (3.3) and 3072 (2.9)
    2: [6.0, 4.0, 3.1, 3.0, 2.9],  # reaches 3.1 exactly at 2048
    3: [6.0, 3.8, 3.0, 2.95, 2.85],  # reaches 2.9 between 3072 (2.95) and 4096 (2.85)
}


def make_run(
    root: Path,
    arm: str,
    seed: int,
    losses: list[float],
    *overrides: str,
    finished: bool = True,
    summary: bool = True,
    name: str | None = None,
) -> Path:
    """A run directory as training writes it (config.yaml, metrics.jsonl, summary.json)."""
    run_dir = root / (name or f"{arm}-s{seed}")
    run_dir.mkdir(parents=True)
    cfg = load_config(
        "tiny",
        [
            f"arm={arm}",
            f"training.seed={seed}",
            f"training.output_dir={run_dir}",
            f"training.train_steps={STEPS}",
            f"training.eval_interval={EVAL_EVERY}",
            *overrides,
        ],
    )
    (run_dir / "config.yaml").write_text(dump_config(cfg, extra={"git_sha": "x"}))
    lines = []
    for tokens, loss in zip(EVAL_TOKENS, losses):
        step = tokens // TOKENS_PER_STEP
        for s in range(max(1, step - EVAL_EVERY + 1), step + 1):
            lines.append(
                {
                    "kind": "train",
                    "step": s,
                    "tokens": s * TOKENS_PER_STEP,
                    "frac": s / STEPS,
                    "loss": loss + 0.1,
                }
            )
        lines.append(
            {
                "kind": "eval",
                "step": step,
                "tokens": tokens,
                "frac": step / STEPS,
                "val_loss": loss,
                "val_ppl": math.exp(loss),
            }
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if summary:
        steps = STEPS if finished else STEPS // 2
        data = {
            "name": "tiny",
            "arm": arm,
            "seed": seed,
            "steps": steps,
            "planned_steps": STEPS,
            "finished": finished,
            "tokens": steps * TOKENS_PER_STEP,
            "final_val_loss": losses[-1],
            "final_val_ppl": math.exp(losses[-1]),
            "release": {},
        }
        (run_dir / "summary.json").write_text(json.dumps(data))
    return run_dir


def sample_sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def naive_mean_abs(values: list[float]) -> float:
    """|sum(values) / n - the correctly rounded mean|: n - 1 additions and a division on values
    <= max|v| round by <= U64 max|v| each, one more rounding on the other side: n U64 max|v|."""
    return (len(values) + 1) * U64 * max(abs(v) for v in values)


def naive_sd_abs(values: list[float]) -> float:
    """|sample_sd - statistics.stdev| (the latter exact up to its final rounding): the naive mean's
    error plus the subtraction's U64 |v - m| shifts each deviation, so the sd moves by <=
    sqrt(n/(n-1)) times that; squares, n - 1 additions, division, sqrt: (n + 3) U64 relative."""
    n, sd = len(values), sample_sd(values)
    mean = sum(values) / n
    dev = naive_mean_abs(values) + U64 * max(abs(v - mean) for v in values)
    return math.sqrt(n / (n - 1)) * dev + (n + 4) * U64 * sd


@pytest.fixture
def paired(tmp_path):
    root = tmp_path / "runs"
    for seed in (1, 2, 3):
        make_run(root, "control", seed, CONTROL[seed])
        # logging/name/rules differ on purpose: they are not part of the comparison contract.
        make_run(
            root,
            "intervention",
            seed,
            INTERVENTION[seed],
            RULE,
            "name=other",
            "logging.tensorboard=false",
        )
    return root


def test_interpolation_and_not_reached():
    curve = [(0, 6.0), (1024, 4.0), (2048, 3.5)]
    # Every value is dyadic: (4.0 - 3.75) / (4.0 - 3.5) * 1024 + 1024 is computed exactly.
    assert tokens_to_target(curve, 3.75) == 1536.0
    assert tokens_to_target(curve, 4.0) == 1024.0  # exactly reached at an eval point
    assert tokens_to_target(curve, 7.0) == 0.0  # already reached at the first point
    assert tokens_to_target(curve, 3.4) is None
    # The first crossing counts, even if the curve rises again afterwards; NaN points are skipped.
    bumpy = [(0, 6.0), (100, math.nan), (200, 4.0), (300, 5.0), (400, 3.0)]
    assert tokens_to_target(bumpy, 4.5) == 0 + (6.0 - 4.5) / 2.0 * 200  # dyadic: exact


def test_paired_table_matches_hand_computation(paired, tmp_path, capsys, monkeypatch):
    # No downstream view: Table 1 alone (the eval_table import is a plain one now).
    monkeypatch.setattr(cli_compare, "downstream_table", lambda run_dirs, control_arm, metric: None)
    out_json = tmp_path / "cmp.json"
    assert main(["compare", str(paired), "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["seeds"] == [1, 2, 3]
    ctl, itv = result["arms"]["control"], result["arms"]["intervention"]
    # Final losses: control 3.0, 3.1, 2.9; intervention 2.8, 2.9, 2.85.
    assert ctl["final_val_loss"]["mean"] == pytest.approx(3.0, abs=LOSS_ABS)
    assert ctl["final_val_loss"]["sd"] == pytest.approx(0.1, abs=LOSS_ABS)
    assert itv["final_val_loss"]["mean"] == pytest.approx(2.85, abs=LOSS_ABS)
    assert itv["final_val_loss"]["sd"] == pytest.approx(0.05, abs=LOSS_ABS)
    ppl_c = [math.exp(x) for x in (3.0, 3.1, 2.9)]
    ppl_i = [math.exp(x) for x in (2.8, 2.9, 2.85)]
    # The same exp values (JSON round-trips floats exactly): only the summation differs.
    assert itv["final_val_ppl"]["mean"] == pytest.approx(sum(ppl_i) / 3, abs=naive_mean_abs(ppl_i))
    assert itv["final_val_ppl"]["sd"] == pytest.approx(sample_sd(ppl_i), abs=naive_sd_abs(ppl_i))
    diff = result["differences"]["intervention"]
    # Paired loss differences -0.2, -0.2, -0.05.
    assert diff["final_val_loss"]["mean"] == pytest.approx(-0.15, abs=LOSS_ABS)
    assert diff["final_val_loss"]["sd"] == pytest.approx(math.sqrt(0.0075), abs=LOSS_ABS)
    d_ppl = [b - a for a, b in zip(ppl_c, ppl_i)]
    # b - a of the same floats as compare computes them: again only the summation differs.
    assert diff["final_val_ppl"]["mean"] == pytest.approx(sum(d_ppl) / 3, abs=naive_mean_abs(d_ppl))
    assert diff["final_val_ppl"]["sd"] == pytest.approx(sample_sd(d_ppl), abs=naive_sd_abs(d_ppl))
    # Tokens to the paired control's final loss:
    # s1: 2048 + (3.3 - 3.0) / (3.3 - 2.9) * 1024 = 2816; s2: 2048; s3: 3072 + 0.5 * 1024 = 3584.
    pairs = {p["seed"]: p for p in result["pairs"]}
    tokens = [pairs[s]["tokens_to_target"] for s in (1, 2, 3)]
    assert tokens == pytest.approx([2816, 2048, 3584], abs=TOKENS_ABS)
    saved = [pairs[s]["saving_tokens"] for s in (1, 2, 3)]
    assert saved == pytest.approx([1280, 2048, 512], abs=TOKENS_ABS)
    percent = [pairs[s]["saving_percent"] for s in (1, 2, 3)]
    assert percent == pytest.approx([31.25, 50.0, 12.5], abs=PERCENT_ABS)
    # A mean keeps the per-seed bound (+ one rounding); an sd moves by <= sqrt(3/2) * 2 of it.
    assert itv["tokens_to_target"]["mean"] == pytest.approx(2816, abs=TOKENS_ABS)
    assert itv["tokens_to_target"]["sd"] == pytest.approx(768, abs=3 * TOKENS_ABS)
    assert itv["token_saving"]["tokens"]["mean"] == pytest.approx(1280, abs=TOKENS_ABS)
    assert itv["token_saving"]["percent"]["mean"] == pytest.approx(31.25, abs=PERCENT_ABS)
    assert itv["token_saving"]["percent"]["sd"] == pytest.approx(18.75, abs=3 * PERCENT_ABS)
    assert diff["tokens_to_target"]["mean"] == pytest.approx(-1280, abs=TOKENS_ABS)
    assert ctl["tokens_to_target"]["mean"] == BUDGET
    table = capsys.readouterr().out
    assert "| control | 3.0000 ± 0.1000 |" in table
    assert "| intervention | 2.8500 ± 0.0500 |" in table
    assert "| 2,816 ± 768 | 1,280 / 31.25 ± 18.75% |" in table
    assert "| Difference (intervention − control) | -0.1500 ± 0.0866 |" in table


def test_single_seed_sd_is_na_and_not_reached(tmp_path):
    make_run(tmp_path, "control", 7, CONTROL[1])
    make_run(tmp_path, "slow", 7, [6.0, 4.5, 3.9, 3.5, 3.3], "optim.lr_multiplier=0.5")
    result = load_and_compare([tmp_path / "control-s7", tmp_path / "slow-s7"])
    assert result["arms"]["slow"]["final_val_loss"]["sd"] is None
    assert result["arms"]["slow"]["tokens_to_target"] is None
    assert result["pairs"][0]["tokens_to_target"] is None
    table = format_table(result)
    assert "3.3000 ± n/a" in table and "not reached (1/1 seeds)" in table
    assert "| 7 | slow | 3.0000 | +0.3000 |" in table


def test_unpaired_seed_is_refused(tmp_path):
    make_run(tmp_path, "control", 1, CONTROL[1])
    make_run(tmp_path, "control", 2, CONTROL[2])
    make_run(tmp_path, "intervention", 1, INTERVENTION[1], RULE)
    with pytest.raises(CompareError, match=r"control-s2.*seed 2 .*unpaired"):
        load_and_compare([tmp_path])


def test_mismatched_configs_name_the_keys(tmp_path):
    make_run(tmp_path, "control", 1, CONTROL[1])
    make_run(
        tmp_path, "intervention", 1, INTERVENTION[1], RULE, "model.hidden_size=128", "optim.lr=1e-3"
    )
    with pytest.raises(CompareError, match=r"intervention-s1.*model\.hidden_size.*optim\.lr"):
        load_and_compare([tmp_path])


@pytest.mark.parametrize("kind", ["no-summary", "not-finished"])
def test_unfinished_run_is_refused(tmp_path, kind):
    make_run(tmp_path, "control", 1, CONTROL[1])
    make_run(
        tmp_path,
        "intervention",
        1,
        INTERVENTION[1],
        RULE,
        summary=kind != "no-summary",
        finished=False,
    )
    with pytest.raises(CompareError, match=r"intervention-s1.*did not finish"):
        load_and_compare([tmp_path])


def test_duplicate_arm_and_seed_is_refused(tmp_path, capsys):
    make_run(tmp_path, "control", 1, CONTROL[1])
    make_run(tmp_path, "intervention", 1, INTERVENTION[1], RULE)
    make_run(tmp_path, "intervention", 1, INTERVENTION[2], RULE, name="again")
    with pytest.raises(CompareError, match=r"both arm 'intervention' seed 1"):
        load_and_compare([tmp_path])
    assert main(["compare", str(tmp_path)]) == 2
    assert "both arm 'intervention' seed 1" in capsys.readouterr().err


def test_missing_control_arm(tmp_path):
    make_run(tmp_path, "a", 1, CONTROL[1])
    make_run(tmp_path, "b", 1, INTERVENTION[1], RULE)
    with pytest.raises(CompareError, match="no run of the control arm 'control'"):
        load_and_compare([tmp_path])
    result = load_and_compare([tmp_path], control_arm="a")
    assert result["differences"]["b"]["final_val_loss"]["mean"] == pytest.approx(-0.2, abs=LOSS_ABS)


def test_eval_table_is_appended_when_its_module_exists(paired, tmp_path, monkeypatch, capsys):
    def fake_eval_table(run_dirs, control_arm, metric="acc"):
        assert any(p.endswith("control-s1") for p in run_dirs), run_dirs
        return f"DOWNSTREAM {len(run_dirs)} {control_arm}", {"tasks": 7}

    monkeypatch.setattr(compare_load, "eval_table", fake_eval_table)
    out_json = tmp_path / "cmp.json"
    # No eval*.json in the runs: the downstream view is not asked for.
    assert main(["compare", str(paired), "--json", str(out_json)]) == 0
    assert "DOWNSTREAM" not in capsys.readouterr().out
    assert "eval_table" not in json.loads(out_json.read_text())
    (paired / "control-s1" / "eval.json").write_text("{}")
    assert main(["compare", str(paired), "--json", str(out_json)]) == 0
    assert "DOWNSTREAM 6 control" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["eval_table"] == {"tasks": 7}


def test_compare_appends_the_real_table2_view(paired, tmp_path, capsys):
    """With downstream reports in the run directories, compare prints and writes Table 2."""
    piqa = {("control", 1): 0.60, ("control", 2): 0.62, ("control", 3): 0.61}
    piqa |= {("intervention", 1): 0.61, ("intervention", 2): 0.63, ("intervention", 3): 0.64}
    for (arm, seed), acc in piqa.items():
        report = {"format": "megatron-qk-eval/1", "step": 100, "arm": arm, "seed": seed,
                  "tasks": {"piqa": {"acc": acc, "samples": 100}}}  # fmt: skip
        (paired / f"{arm}-s{seed}" / "eval.json").write_text(json.dumps(report))
    out_json = tmp_path / "cmp.json"
    assert main(["compare", str(paired), "--json", str(out_json)]) == 0
    assert "Downstream evaluation (Table 2): intervention vs control" in capsys.readouterr().out
    table = json.loads(out_json.read_text())["eval_table"]["tables"]["intervention"]
    (row,) = table["rows"]
    # Paired deltas in percentage points: +1, +1, +3.
    assert row["task"] == "piqa" and row["wins"] == 3
    # Accuracies < 1 are stored within 2^-54 of their decimals and subtracted exactly
    # (Sterbenz); x 100 rounds once (<= U64 * 3): each delta is within 100 * 2^-53 + 3 U64 of
    # its decimal; the mean adds the sum's and division's roundings (< 13 U64): 116 U64 ~ 1.3e-14;
    # the sd moves by <= sqrt(3/2) * 2 < 3 times that. The deltas checked are 1-3 pp.
    assert row["delta_pp"]["mean"] == pytest.approx(5 / 3, abs=(100 + 16) * U64)
    assert row["delta_pp"]["std"] == pytest.approx(sample_sd([1.0, 1.0, 3.0]), abs=3 * 116 * U64)


def test_compare_metric_flag_chooses_acc_or_acc_norm(paired, tmp_path, capsys):
    """eval.json holds acc and acc_norm; --metric picks the one Table 2 shows."""
    for arm, seed in [(a, s) for a in ("control", "intervention") for s in (1, 2, 3)]:
        acc, norm = (0.60, 0.70) if arm == "control" else (0.61, 0.75)
        task = {"acc": acc, "acc_norm": norm, "samples": 100}
        report = {"format": "megatron-qk-eval/1", "step": 100, "arm": arm, "seed": seed}
        report["tasks"] = {"hellaswag": task}
        (paired / f"{arm}-s{seed}" / "eval.json").write_text(json.dumps(report))
    deltas = {}
    for metric in ("acc", "acc_norm"):
        out_json = tmp_path / f"{metric}.json"
        assert main(["compare", str(paired), "--metric", metric, "--json", str(out_json)]) == 0
        data = json.loads(out_json.read_text())["eval_table"]
        assert data["metric"] == metric
        (row,) = data["tables"]["intervention"]["rows"]
        deltas[metric] = row["delta_pp"]["mean"]
    capsys.readouterr()
    assert deltas["acc"] == pytest.approx(1.0, abs=1e-9)
    assert deltas["acc_norm"] == pytest.approx(5.0, abs=1e-9)
