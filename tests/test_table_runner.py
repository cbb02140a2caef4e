"""``megatron-qk table``: the plan (every distinct run once, relabelled runs shared unless
``--separate``, GPU-hours by formula), a table that cannot be produced failing with the reason,
and smoke mode's offline stand-ins of the downstream suite (the end-to-end run of Table 2 is in
test_table_smoke.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_run_finder import make_run

from megatron_qk.analysis.smoke_tasks import SMOKE_EVAL_DIR
from megatron_qk.analysis.table_plan import build_plan, gpu_hours
from megatron_qk.analysis.table_runner import (
    SMOKE_OVERRIDES,
    TableError,
    smoke_eval_options,
    train_runs,
)
from megatron_qk.cli import main
from megatron_qk.config.loader import load_config
from megatron_qk.data.tokenizer import load_tokenizer
from megatron_qk.evaluation.suite import PAPER_SUITE, parse_task_list, resolve_tasks
from megatron_qk.models.flops import flops_per_token

RECIPE = "base: tiny\nname: {name}\narm: {arm}\ntraining:\n  train_steps: 10\n  eval_interval: 2\n"
RULE = "optim:\n  rules:\n    - name: upper_qk\n"


def _table(root: Path, name: str, arms: list[str], seeds: str = "1") -> Path:
    table = root / name
    table.mkdir(parents=True)
    (table / "seeds").write_text(seeds + "\n")
    for arm in arms:
        rule = RULE if arm in ("intervention", "adaptive") else ""
        (table / f"{arm}.yaml").write_text(RECIPE.format(name=name, arm=arm) + rule)
    return table


def test_plan_shares_relabelled_runs_unless_separate(tmp_path):
    first = _table(tmp_path, "first", ["control", "intervention"])
    second = _table(tmp_path, "second", ["adaptive", "control"])
    plan = build_plan([first, second])
    shared = {r.out: r.shared_with for r in plan if r.shared_with}
    assert shared == {
        "runs/second/adaptive-s1": "runs/first/intervention-s1",
        "runs/second/control-s1": "runs/first/control-s1",
    }
    # Same recipe apart from the label: shared by default, two runs with --separate.
    separate = {r.out: r.shared_with for r in build_plan([first, second], separate=True)}
    assert separate["runs/second/adaptive-s1"] is None
    assert separate["runs/second/control-s1"] == "runs/first/control-s1"
    # Cost by formula: 10 steps x 8 x 64 tokens x FLOPs/token + 6 evaluations (0, 2, ..., 10) of
    # 2 batches of 8 x 64 tokens, forward only (a third).
    cfg = load_config("tiny", [])
    fpt = flops_per_token(cfg.model, 50304)
    assert plan[0].flops == pytest.approx(10 * 512 * fpt + 6 * 2 * 512 * fpt / 3, rel=1e-12)
    assert gpu_hours(0.4 * 989e12 * 3600, 0.4, 989) == pytest.approx(1.0)


def test_plan_of_every_paper_table(capsys):
    assert main(["table", "all", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "34 distinct runs; 14 linked" in out
    assert "runs/table9_fixed_release/adaptive-s1 -> runs/table1_gpt270m/intervention-s1" in out
    assert "| table11_gpt0.7b | 132.6 |" in out and "| all | 212.3 |" in out


def test_a_table_that_cannot_be_produced_fails_with_the_reason(tmp_path, capsys):
    table = _table(tmp_path, "tbl", ["control", "intervention"])
    runs = tmp_path / "runs"
    for arm, seed in (("control", 1), ("intervention", 1), ("control", 2)):
        make_run(runs / "tbl", arm, seed)
    rc = main(["table", str(table), "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "`megatron-qk compare" in err and "failed (exit 2)" in err
    assert "unpaired seed" in err


# -- smoke mode's downstream evaluation: a tokenizer of the smoke vocabulary, stand-in tasks ----
def _eval_tasks(root: Path, text: str) -> Path:
    path = root / "eval_tasks"
    path.write_text(text + "\n")
    return path


def test_smoke_tokenizer_has_the_smoke_models_vocabulary(tmp_path):
    options = smoke_eval_options(_eval_tasks(tmp_path, "paper"), tmp_path / "runs")
    spec = options[options.index("--tokenizer") + 1]
    tok = load_tokenizer(spec)
    assert f"model.vocab_size={tok.vocab_size}" in SMOKE_OVERRIDES and tok.vocab_size == 128
    assert tok.eod_id == 0 and tok.encoding.decode([tok.eod_id]) == "<|endoftext|>"
    text = "Q: The sky is\nA: blue"
    ids = tok.encoding.encode_ordinary(text)
    assert ids == [ord(c) for c in text] and tok.encoding.decode(ids) == text
    assert tok.encoding.encode_ordinary("é") == [1]  # <unk>, not an id beyond the vocabulary


def test_smoke_stand_ins_are_the_paper_suite(tmp_path):
    runs = tmp_path / "runs"
    options = smoke_eval_options(_eval_tasks(tmp_path, "paper"), runs)
    task_dir = Path(options[options.index("--task-dir") + 1])
    _, resolved = resolve_tasks(parse_task_list("paper"), [task_dir])
    by_name = {r.name: r for r in resolved}
    assert list(by_name) == list(PAPER_SUITE)
    assert by_name["lambada"].harness_name == "lambada_openai" and by_name["mmlu"].is_group
    assert not any(by_name[n].is_group for n in PAPER_SUITE if n != "mmlu")
    # Written once: a second table run leaves the files (and the datasets cache's keys) alone.
    files = sorted(p for p in (runs / SMOKE_EVAL_DIR).rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    assert smoke_eval_options(_eval_tasks(tmp_path, "paper"), runs) == options
    assert [p.stat().st_mtime_ns for p in files] == stamps


def test_smoke_refuses_tasks_without_a_stand_in(tmp_path):
    with pytest.raises(TableError, match="stand-ins for the paper's suite only.*not for boolq"):
        smoke_eval_options(_eval_tasks(tmp_path, "paper,boolq"), tmp_path / "runs")


@pytest.mark.parametrize("smoke", [False, True])
def test_eval_follows_each_finished_run_of_a_table_with_eval_tasks(tmp_path, monkeypatch, smoke):
    monkeypatch.delenv("EVAL", raising=False)
    table = _table(tmp_path, "tbl", ["control", "intervention"])
    _eval_tasks(table, "paper")
    runs = tmp_path / "runs"
    for arm in ("control", "intervention"):
        make_run(runs / "tbl", arm, 1)
    calls: list[list[str]] = []
    train_runs(table, runs, calls.append, smoke=smoke)
    stand_ins = runs / SMOKE_EVAL_DIR
    extra = ["--tokenizer", f"{stand_ins / 'tokenizer.json'}::<|endoftext|>",
             "--task-dir", str(stand_ins / "tasks")] if smoke else []  # fmt: skip
    assert calls == [
        ["eval", "--checkpoint", str(runs / "tbl" / f"{arm}-s1"), "--tasks", "paper", *extra]
        for arm in ("control", "intervention")
    ]
    assert stand_ins.is_dir() == smoke  # a cluster run writes no stand-ins
