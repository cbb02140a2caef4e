"""``megatron-qk replay-release``: the trainer's release state machine replayed on logged scores."""

import json
from pathlib import Path

import pytest

from megatron_qk.analysis.replay import ReleaseSettings, ReplayError, replay_release
from megatron_qk.analysis.replay_log import replay_run
from megatron_qk.cli import main
from megatron_qk.config.loader import dump_config, load_config

PAPER = ReleaseSettings(threshold=0.005, patience=3, min_frac=0.03, max_frac=0.12)
LOW, HIGH = 0.001, 0.02


def scores(planned: int, every: int, high_from: int | None, dips=()) -> list[tuple[int, float]]:
    """Lower-copy scores at steps 0, every, 2*every, ...: HIGH from ``high_from`` on."""
    out = []
    for step in range(0, planned + 1, every):
        mature = high_from is not None and step >= high_from and step not in dips
        out.append((step, HIGH if mature else LOW))
    return out


def test_threshold_decides_which_evaluations_count():
    seq = [(s, 0.006 if s >= 4 else LOW) for s in range(0, 101)]
    paper = replay_release(seq, 100, PAPER)
    assert (paper.step, paper.reason) == (6, "maturity")  # 0.006 >= 0.005 at steps 4, 5, 6
    higher = replay_release(seq, 100, ReleaseSettings(threshold=0.007))
    assert (higher.step, higher.reason) == (12, "forced")  # 0.006 never counts


def test_patience_and_a_dip_reset_the_count():
    seq = scores(100, 1, high_from=5, dips=(7,))
    # Steps 5, 6 count, 7 resets, 8, 9, 10 complete the patience.
    assert replay_release(seq, 100, PAPER).step == 10
    assert replay_release(seq, 100, ReleaseSettings(patience=1)).step == 5
    strict = replay_release(seq, 100, ReleaseSettings(patience=5))
    assert (strict.step, strict.reason) == (12, "forced")  # checked before the step-12 eval
    # NaN (no repeated-token position) resets like a low score: 5 counts, 6 resets, 7-9 count.
    with_nan = [(s, float("nan") if s == 6 else v) for s, v in scores(100, 1, high_from=5)]
    assert replay_release(with_nan, 100, PAPER).step == 9


def test_earliest_release_respects_min_frac():
    seq = scores(100, 1, high_from=0)  # mature from the start
    event = replay_release(seq, 100, PAPER)
    # Evaluations at 0, 1, 2 (< 3%) neither count nor reset: 3, 4, 5 complete the patience.
    assert (event.step, event.frac, event.reason) == (5, 0.05, "maturity")
    event = replay_release(seq, 100, ReleaseSettings(patience=1))
    assert (event.step, event.frac) == (3, 0.03)


def test_forced_release_at_the_first_step_past_max_frac_even_between_evaluations():
    seq = scores(100, 5, high_from=None)  # evaluations at 0, 5, 10, 15, ...; never mature
    event = replay_release(seq, 100, PAPER)
    assert (event.step, event.reason) == (12, "forced")  # not an evaluation step
    # 12% of 30 steps is 3.6: forced after step 4.
    assert replay_release(scores(30, 5, None), 30, PAPER).step == 4
    # A shorter window forces earlier.
    short = replay_release(seq, 100, ReleaseSettings(max_frac=0.08))
    assert (short.step, short.reason) == (8, "forced")


def test_never_matures_within_the_replayed_steps():
    seq = scores(100, 5, high_from=None)
    # A log that stops before max_frac (an unfinished run) has no release yet.
    assert replay_release(seq, 100, PAPER, end_step=11) is None
    # Maturity after the forced point is too late: the release is forced.
    late = replay_release(scores(100, 5, high_from=20), 100, PAPER)
    assert (late.step, late.reason) == (12, "forced")


def write_run(
    run_dir: Path,
    seq: list[tuple[int, float]],
    planned: int,
    release: dict | None = None,
    rules: str | None = None,
) -> Path:
    """metrics.jsonl (train lines every step, eval + diag at the scores' steps), optional config."""
    run_dir.mkdir(parents=True)
    if rules is not None:
        cfg = load_config(
            "tiny",
            [f"training.train_steps={planned}", "training.eval_interval=1", rules],
        )
        (run_dir / "config.yaml").write_text(dump_config(cfg, extra={"git_sha": None}))
    by_step = dict(seq)
    lines = []
    for step in range(0, planned + 1):
        base = {"step": step, "tokens": step * 512, "frac": step / planned}
        if step:
            lines.append({"kind": "train", "loss": 3.0, **base})
        if release is not None and release["step"] == step and release["reason"] == "forced":
            lines.append({"kind": "release", **base, **release})
        if step in by_step:
            lines.append({"kind": "eval", "val_loss": 3.0, "val_ppl": 20.0, **base})
            lines.append({"kind": "diag", "lower_copy": by_step[step], **base})
        if release is not None and release["step"] == step and release["reason"] != "forced":
            lines.append({"kind": "release", **base, **release})
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


RULE = (
    "optim.rules=[{name: upper_qk, threshold: 0.01, patience: 2, min_frac: 0.1, max_frac: 0.5},"
    " {name: fixed_v, roles: [v], release: fixed, release_frac: 0.2}]"
)


def test_settings_come_from_the_run_config_and_agree_with_its_release(tmp_path, capsys):
    seq = scores(40, 2, high_from=8)  # evaluations every 2 steps; window from step 4
    logged = {"rule": "upper_qk", "reason": "maturity", "step": 10}
    path = write_run(tmp_path / "run", seq, 40, logged, RULE)
    result = replay_run(path)
    assert result["settings"] == {
        "threshold": 0.01,
        "patience": 2,
        "min_frac": 0.1,
        "max_frac": 0.5,
        "threshold_mode": "absolute",
        "threshold_ratio": None,
    }
    assert result["planned_steps"] == 40 and result["replayed_through_step"] == 40
    assert result["replayed"] == {
        "rule": "upper_qk",
        "reason": "maturity",
        "step": 10,
        "frac": 0.25,
        "score": HIGH,  # the score of the evaluation that completed the patience
        "threshold": 0.01,
        "threshold_mode": "absolute",
    }
    assert result["agrees"] is True
    assert main(["replay-release", str(path)]) == 0
    out = capsys.readouterr().out
    assert "replayed release: step 10 (25.00%, maturity)" in out and "agrees" in out
    # Flags change the settings: no agreement is expected and none is claimed.
    other = replay_run(path, overrides={"patience": 4})
    assert other["replayed"]["step"] == 14 and other["agrees"] is None
    with pytest.raises(ReplayError, match="no maturity rule 'fixed_v'"):
        replay_run(path, rule="fixed_v")


def test_a_disagreeing_log_is_reported(tmp_path, capsys):
    seq = scores(40, 2, high_from=8)
    wrong = {"rule": "upper_qk", "reason": "maturity", "step": 12}
    path = write_run(tmp_path / "run", seq, 40, wrong, RULE)
    assert replay_run(path)["agrees"] is False
    assert main(["replay-release", str(path)]) == 1
    assert "agrees with the run's own release: NO" in capsys.readouterr().out


def test_without_config_paper_defaults_and_planned_steps_from_frac(tmp_path, capsys):
    path = write_run(tmp_path / "bare", scores(100, 1, high_from=None), 100)
    result = replay_run(path)
    assert result["planned_steps"] == 100 and result["settings_from"] == "the paper's defaults"
    assert result["settings"] == dict(
        threshold=0.005,
        patience=3,
        min_frac=0.03,
        max_frac=0.12,
        threshold_mode="absolute",
        threshold_ratio=None,
    )
    assert (result["replayed"]["step"], result["replayed"]["reason"]) == (12, "forced")
    assert result["logged"] is None and result["agrees"] is None
    assert main(["replay-release", str(path), "--variants", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # Around the paper's rule the variants are Table 8's rows.
    table8 = [
        (r["settings"]["threshold"], r["settings"]["patience"], r["settings"]["max_frac"])
        for r in data["variants"]
    ]
    assert table8 == [
        (0.005, 3, 0.12),
        (0.003, 3, 0.12),
        (0.007, 3, 0.12),
        (0.005, 1, 0.12),
        (0.005, 5, 0.12),
        (0.005, 3, 0.08),
    ]
    points = {row["label"]: row["replayed"]["step"] for row in data["variants"]}
    assert points == {
        "Main rule": 12,
        "Lower threshold": 12,
        "Higher threshold": 12,
        "No patience": 12,
        "Stricter patience": 12,
        "Shorter forced window": 8,
    }


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(ReplayError, match="no such metrics file"):
        replay_run(tmp_path / "missing.jsonl")
    empty = tmp_path / "e" / "metrics.jsonl"
    empty.parent.mkdir()
    empty.write_text(json.dumps({"kind": "train", "step": 1, "frac": 0.1}) + "\n")
    with pytest.raises(ReplayError, match="no diag lines"):
        replay_run(empty)
    path = write_run(tmp_path / "r", scores(20, 1, None), 20)
    assert main(["replay-release", str(path), "--patience", "0"]) == 2
    assert "patience must be >= 1" in capsys.readouterr().err


# --- agreement with a real training run ------------------------------------------------------
# Three controllers in one 12-step run with an evaluation after every step: upper_qk matures
# (the synthetic stream's lower-copy score is ~0.03 from the start, above 0.01) once patience 2
# is met inside [0.25, 0.9]; lower_qk can never mature (threshold 1) and is forced at
# ceil(0.5 * 12) = 6; the entropy floor matures at its first in-window evaluation; upper_o
# compares lower_copy / lower_copy_uniform with 0.5 (attention that copies at half the rate of
# uniform attention or better) and matures like upper_qk.
REAL_RULES = (
    "optim.rules=[{name: upper_qk, threshold: 0.01, patience: 2, min_frac: 0.25, max_frac: 0.9,"
    " ramp_frac: 0.1}, {name: lower_qk, layers: lower_half, threshold: 1.0, patience: 1,"
    " min_frac: 0.1, max_frac: 0.5, ramp_frac: 0.1}, {name: upper_o, roles: [o],"
    " threshold_mode: over_uniform, threshold_ratio: 0.5, patience: 2, min_frac: 0.25,"
    " max_frac: 0.9, ramp_frac: 0.1}]"
)
FLOOR = (
    "optim.entropy_floor={enabled: true, threshold: 0.02, patience: 1, min_frac: 0.3,"
    " max_frac: 0.8}"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron_qk.training.entry import train_from_config

    run_dir = tmp_path_factory.mktemp("replay") / "run"
    cfg = load_config(
        "tiny",
        [
            f"training.output_dir={run_dir}",
            "training.train_steps=12",
            "training.eval_interval=1",
            "training.eval_iters=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            REAL_RULES,
            FLOOR,
        ],
    )
    train_from_config(cfg)
    return run_dir


@pytest.mark.parametrize(
    "rule, reason",
    [
        ("upper_qk", "maturity"),
        ("lower_qk", "forced"),
        ("entropy_floor", "maturity"),
        ("upper_o", "maturity"),
    ],
)
def test_replay_agrees_with_the_training_run(trained, rule, reason):
    records = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["kind"] == "release" and r["rule"] == rule]
    assert len(logged) == 1 and logged[0]["reason"] == reason
    result = replay_run(trained / "metrics.jsonl", rule=rule)
    assert result["settings_from"] == "the run's config"
    keys = ("rule", "reason", "step", "frac")
    assert {k: result["replayed"][k] for k in keys} == {k: logged[0][k] for k in keys}
    if reason == "maturity":  # the release line records the score and threshold it fired on
        for key in ("score", "threshold", "threshold_mode"):
            assert result["replayed"][key] == logged[0][key]
    assert result["agrees"] is True
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["release"][rule]["step"] == result["replayed"]["step"]


def test_variants_aggregate_over_several_runs_like_table8(tmp_path, capsys):
    # Seed A matures from step 5, seed B from step 7 (evaluations every step, 100 planned):
    # the main rule (patience 3, min 3%) releases at 7 and 9; no patience at 5 and 7.
    a = write_run(tmp_path / "a", scores(100, 1, high_from=5), 100)
    b = write_run(tmp_path / "b", scores(100, 1, high_from=7), 100)
    assert main(["replay-release", str(a), str(b), "--variants", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["metrics"] for r in data["runs"]] == [str(a), str(b)]
    rows = {row["label"]: row for row in data["variants"]}
    main_rule = rows["Main rule"]
    assert [r["step"] for r in main_rule["per_run"]] == [7, 9]
    assert main_rule["mean_frac"] == pytest.approx(0.08)
    assert main_rule["sd_frac"] == pytest.approx(2**0.5 * 0.01)  # sample sd of 0.07, 0.09
    assert [r["step"] for r in rows["No patience"]["per_run"]] == [5, 7]
    assert main(["replay-release", str(a), str(b), "--variants"]) == 0
    text = capsys.readouterr().out
    assert (
        "Table 8 over 2 runs" in text and "| Main rule | 0.005 | 3 | 3–12% | 8.00% ± 1.41 |" in text
    )


def test_diag_lines_carry_the_uniform_baseline_and_the_compared_score(trained):
    records = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    diags = [r for r in records if r["kind"] == "diag"]
    assert len(diags) == 13  # steps 0 .. 12
    for d in diags:
        assert 0.0 < d["lower_copy_uniform"] < 1.0
        assert d["maturity_score"] == d["lower_copy"]  # the first maturity rule is absolute
    (line,) = [r for r in records if r["kind"] == "release" and r["rule"] == "upper_o"]
    at = next(d for d in diags if d["step"] == line["step"])
    assert line["threshold_mode"] == "over_uniform" and line["threshold"] == 0.5
    assert line["score"] == at["lower_copy"] / at["lower_copy_uniform"]
    summary = json.loads((trained / "summary.json").read_text())["release"]["upper_o"]
    assert (summary["score"], summary["threshold"]) == (line["score"], 0.5)


def test_over_uniform_replay_on_logged_baselines(tmp_path, capsys):
    """Raw scores all above the paper's 0.005; only their ratio to the baseline matures."""
    seq = [(s, 0.03 if s >= 6 else 0.02, 0.02) for s in range(0, 101, 2)]
    ratio = ReleaseSettings(threshold_mode="over_uniform", threshold_ratio=1.3)
    event = replay_release(seq, 100, ratio)
    assert (event.step, event.reason, event.score) == (10, "maturity", 1.5)  # 6, 8, 10
    assert replay_release(seq, 100, PAPER).step == 8  # absolute: 0.02 >= 0.005 at 4, 6, 8
    path = tmp_path / "run"
    path.mkdir()
    lines = []
    for step, copy, base in seq:
        common = {"step": step, "tokens": step * 512, "frac": step / 100}
        lines.append({"kind": "diag", "lower_copy": copy, "lower_copy_uniform": base, **common})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # A ratio flag implies the over_uniform mode.
    assert main(["replay-release", str(path), "--threshold-ratio", "1.3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["replayed"]["step"] == 10 and result["first_crossing"]["step"] == 6
    assert result["settings"]["threshold_mode"] == "over_uniform"
    assert main(["replay-release", str(path), "--threshold-mode", "over_uniform"]) == 2
    assert "threshold_ratio" in capsys.readouterr().err
