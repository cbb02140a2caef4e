"""Reproduction protocol: fraction checkpoints, stopping on purpose, data order independent of
the seed, and compare refusing pairs that read different data."""

import json
from pathlib import Path

import pytest

from megatron_qk.analysis.compare import CompareError, Run
from megatron_qk.analysis.compare_load import validate_runs
from megatron_qk.config.loader import load_config
from megatron_qk.training import checkpoint_plan
from megatron_qk.training.entry import train_from_config


def tiny(tmp_path: Path, name: str, *overrides: str):
    return load_config(
        "tiny",
        [
            f"training.output_dir={tmp_path / name}",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *overrides,
        ],
    )


def saved_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("iter_*") if p.is_dir())


def test_step_at_frac_rounds_to_the_nearest_planned_step():
    # gpt-270m: 2.5B tokens / 524,288 per step -> 4769 planned steps.
    cfg = load_config("gpt-270m")
    assert cfg.planned_steps() == 4769
    assert checkpoint_plan.step_at_frac(0.03, 4769) == 143  # 143.07
    assert checkpoint_plan.step_at_frac(0.2, 4769) == 954  # 953.8
    assert checkpoint_plan.step_at_frac(0.5, 10) == 5
    assert checkpoint_plan.step_at_frac(0.25, 10) == 3  # 2.5: halves go up
    assert checkpoint_plan.step_at_frac(0.01, 10) == 1  # never step 0
    assert checkpoint_plan.frac_checkpoint_steps(cfg) == [143, 954]
    stopped = load_config("gpt-270m", ["training.stop_at_frac=0.2", "training.save_interval=0"])
    assert checkpoint_plan.end_step(stopped) == 954
    assert checkpoint_plan.planned_checkpoint_steps(stopped) == [143, 954]


def test_save_at_fracs_survive_rotation_and_resume(tmp_path):
    overrides = (
        "training.train_steps=12",
        "training.eval_interval=6",
        "training.save_interval=2",
        "training.keep_interval_checkpoints=1",
        "training.save_at_fracs=[0.1, 0.5]",  # steps 1 (1.2) and 6
        "diagnostics.enabled=false",
    )
    cfg = tiny(tmp_path, "run", *overrides)
    assert checkpoint_plan.planned_checkpoint_steps(cfg) == [1, 2, 4, 6, 8, 10, 12]
    train_from_config(tiny(tmp_path, "run", *overrides, "training.exit_after_steps=5"))
    # Interval checkpoints 2 and 4 rotated away; the resume point 5 and fraction 1 kept.
    assert saved_steps(tmp_path / "run") == [1, 5]
    train_from_config(tiny(tmp_path, "run", *overrides))
    # After the resume: fractions 1 and 6, the newest interval checkpoint 10 and the end 12.
    assert saved_steps(tmp_path / "run") == [1, 6, 10, 12]
    import torch

    for step in (1, 6):
        state = torch.load(
            tmp_path / "run" / "checkpoints" / f"iter_{step:07d}" / "train_state.pt",
            weights_only=False,
        )
        assert state["step"] == step and state["consumed_samples"] == step * 8


def test_stop_at_frac_writes_a_stopped_summary_and_is_not_rerun(tmp_path):
    overrides = ("training.train_steps=10", "training.stop_at_frac=0.3", "training.eval_interval=0")
    summary = train_from_config(tiny(tmp_path, "stop", *overrides))
    assert summary["steps"] == 3 and summary["stopped"] and not summary["finished"]
    saved = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert saved["stopped"] and saved["planned_steps"] == 10
    lines = (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()
    # The schedule is the 10-step run's: the lr at step 3 is not the end of a 3-step cosine.
    train = [json.loads(x) for x in lines if '"train"' in x]
    assert [r["step"] for r in train] == [1, 2, 3] and train[-1]["frac"] == pytest.approx(0.3)
    again = train_from_config(tiny(tmp_path, "stop", *overrides))
    assert again == json.loads(json.dumps(summary))
    assert (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines() == lines


def _consumed_tokens(monkeypatch, cfg) -> tuple[list, dict]:
    """Train ``cfg`` and record every training micro-batch's tokens."""
    import megatron_qk.training.loop as loop

    seen = []
    real = loop.micro_batches

    def recording(*args, **kwargs):
        for batch in real(*args, **kwargs):
            seen.append(batch["tokens"].clone())
            yield batch

    monkeypatch.setattr(loop, "micro_batches", recording)
    summary = train_from_config(cfg)
    monkeypatch.setattr(loop, "micro_batches", real)
    return seen, summary


def test_seed_changes_the_init_but_not_the_data(tmp_path, monkeypatch):
    common = ("training.train_steps=3", "training.eval_interval=0", "diagnostics.enabled=false")
    a_tokens, a = _consumed_tokens(monkeypatch, tiny(tmp_path, "a", *common, "training.seed=1"))
    b_tokens, b = _consumed_tokens(monkeypatch, tiny(tmp_path, "b", *common, "training.seed=2"))
    c_tokens, c = _consumed_tokens(
        monkeypatch, tiny(tmp_path, "c", *common, "training.seed=1", "training.data_seed=7")
    )
    assert a["data_order"] == b["data_order"] and len(a["data_order"]) == 16
    assert len(a_tokens) == len(b_tokens) > 0
    assert all(bool((x == y).all()) for x, y in zip(a_tokens, b_tokens))
    assert a["final_val_loss"] != b["final_val_loss"]  # the seed still changes the model
    assert c["data_order"] != a["data_order"]
    assert not all(bool((x == y).all()) for x, y in zip(a_tokens, c_tokens))


def _run(path: str, arm: str, seed: int, order: str | None) -> Run:
    return Run(path, arm, seed, 3.0, 20.0, 100, [(0, 5.0), (100, 3.0)], {}, order)


def test_compare_refuses_runs_with_different_data_order():
    runs = [_run("c1", "control", 1, "aaaa"), _run("i1", "intervention", 1, "bbbb")]
    with pytest.raises(CompareError, match=r"i1 and c1 read different data.*allow-different-data"):
        validate_runs(runs, "control")
    validate_runs(runs, "control", allow_different_data=True)
    validate_runs(
        [_run("c1", "control", 1, "aaaa"), _run("i1", "intervention", 1, "aaaa")], "control"
    )
    # Runs written before data_order existed are not refused.
    validate_runs(
        [_run("c1", "control", 1, None), _run("i1", "intervention", 1, "bbbb")], "control"
    )


def test_data_order_of_megatron_indexed_datasets(tmp_path):
    """GPTDataset samples are identified by their documents and offsets; the order follows
    training.data_seed, not training.seed."""
    from data_fixtures import pydoc_docs, run_preprocess, text_records, write_jsonl

    from megatron_qk.training.data import build_datasets
    from megatron_qk.training.data_order import data_order_hash, sample_identity

    src = write_jsonl(tmp_path / "docs.jsonl", text_records(pydoc_docs(40)))
    run_preprocess(tmp_path / "corpus", [src])
    prefix = tmp_path / "corpus_text_document"

    def order(*overrides: str) -> tuple[str, tuple]:
        cfg = tiny(
            tmp_path,
            "idx",
            "data.kind=indexed",
            f"data.train_prefixes=[{prefix}]",
            "data.split=90,10,0",
            "training.train_steps=4",
            f"data.cache_dir={tmp_path / 'cache'}",
            *overrides,
        )
        ds = build_datasets(cfg, cfg.planned_steps(), str(tmp_path / "idx"))
        return data_order_hash(ds.train, ds.valid, 16), sample_identity(ds.train, 0)

    base, first = order("training.seed=1")
    assert first[0] == "gpt" and len(first[1]) >= 1
    assert order("training.seed=2")[0] == base
    assert order("training.data_seed=99")[0] != base
