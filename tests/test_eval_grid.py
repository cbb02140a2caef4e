"""The paper's evaluation grid (``training.eval_interval_frac``): evaluations at
round(k x 0.5% x planned steps), listed by the dry run, used by the trainer, and the grid on which
replay-release reproduces Table 8's release points 3.00 / 4.01 / 4.99 / 5.49%."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_qk.cli import main
from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import dump_config, load_config
from megatron_qk.training.eval_plan import evaluation_steps, should_evaluate

ROOT = Path(__file__).resolve().parents[1]
TABLE1 = ROOT / "examples" / "configs" / "table1_gpt270m"


def test_paper_recipes_evaluate_on_the_half_percent_grid():
    cfg = load_config(str(TABLE1 / "intervention.yaml"), [])
    steps = evaluation_steps(cfg)
    assert cfg.planned_steps() == 4769
    assert {0, 143, 191, 238, 262, 954, 4769} <= set(steps)
    assert 144 not in steps and len(steps) == 201  # step 0 and k = 1 .. 200
    assert should_evaluate(cfg, 143) and not should_evaluate(cfg, 144)
    # Table 5's runs stop at 20%: the grid ends at the stop step (954).
    t5 = load_config(str(ROOT / "examples/configs/table5_ffn_write/gelu3840.yaml"), [])
    assert evaluation_steps(t5)[-1] == 954 and 143 in evaluation_steps(t5)
    with pytest.raises(ConfigError, match="eval_interval_frac"):
        load_config("tiny", ["training.eval_interval_frac=0"])


def test_trainer_evaluates_on_the_fraction_grid(tmp_path):
    from megatron_qk.training.entry import train_from_config

    cfg = load_config(
        "tiny",
        [f"training.output_dir={tmp_path / 'run'}", "training.train_steps=10",
         "training.eval_interval_frac=0.25", "training.eval_iters=1",
         "logging.progress_bar=false", "logging.tensorboard=false",
         "model.num_layers=2", "training.global_batch_size=4",
         "diagnostics.num_sequences=2"],
    )  # fmt: skip
    train_from_config(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # round(2.5) = 3 and round(7.5) = 8 (halves up), 5, 10; and step 0.
    want = evaluation_steps(cfg)
    assert want == [0, 3, 5, 8, 10]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == want
    assert [r["step"] for r in lines if r["kind"] == "diag"] == want


def _paper_grid_log(run_dir: Path) -> Path:
    """Table 1's intervention run on the paper grid: the lower-copy score passes 0.005 from 3%
    on and 0.007 from step 215 (4.51%), what Table 8's rows imply."""
    run_dir.mkdir()
    cfg = load_config(str(TABLE1 / "intervention.yaml"), [f"training.output_dir={run_dir}"])
    (run_dir / "config.yaml").write_text(dump_config(cfg, extra={"git_sha": "x"}))
    planned = cfg.planned_steps()
    lines = []
    for step in evaluation_steps(cfg):
        score = 0.002 if step < 143 else (0.006 if step < 215 else 0.008)
        lines.append(
            {"kind": "diag", "step": step, "tokens": step * 524288, "frac": step / planned,
             "lower_copy": score, "lower_copy_uniform": 0.004}
        )  # fmt: skip
    lines.append({"kind": "release", "step": 191, "frac": 191 / planned, "rule": "upper_qk",
                  "reason": "maturity"})  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


def test_replay_on_the_paper_grid_gives_table8(tmp_path, capsys):
    run = _paper_grid_log(tmp_path / "intervention-s1")
    assert main(["replay-release", str(run), "--variants", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["agrees"] is True
    got = {v["label"]: v["replayed"]["step"] for v in result["variants"]}
    # Main rule and lower threshold and shorter window: 4.01%; no patience: 3.00%; stricter
    # patience: 4.99%; higher threshold (0.007): 5.49%.
    assert result["replayed"]["step"] == 191
    assert got == {
        "Main rule": 191,
        "Lower threshold": 191,
        "Higher threshold": 262,
        "No patience": 143,
        "Stricter patience": 238,
        "Shorter forced window": 191,
    }
    assert main(["replay-release", str(run), "--variants"]) == 0
    text = capsys.readouterr().out
    for pct in ("3.00%", "4.01%", "4.99%", "5.49%"):
        assert pct in text, pct
