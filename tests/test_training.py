"""The training loop end to end on CPU: run-directory contract, learning, resume, NaN stop."""

import json
import math
from pathlib import Path

import megatron.core
import pytest
import yaml
from conftest import subprocess_env

from megatron_qk.config.loader import load_config
from megatron_qk.training.entry import train_from_config


def tiny(tmp_path: Path, name: str, *overrides: str):
    return load_config(
        "tiny",
        [
            f"training.output_dir={tmp_path / name}",
            "training.train_steps=12",
            "training.eval_interval=4",
            "logging.progress_bar=false",
            *overrides,
        ],
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contract_and_learning(tmp_path):
    cfg = tiny(tmp_path, "run", "training.train_steps=30", "training.eval_interval=10")
    summary = train_from_config(cfg)
    run_dir = tmp_path / "run"
    for item in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard"):
        assert (run_dir / item).exists(), item
    meta = yaml.safe_load((run_dir / "config.yaml").read_text())["_meta"]
    # The installed release (each CI leg has its own, docs/VERSIONS.md).
    assert meta["megatron_core"] == str(megatron.core.__version__)
    assert meta["torch"] and "git_sha" in meta
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("final_val_loss", "final_val_ppl", "steps", "tokens", "arm", "seed", "release"):
        assert key in saved
    assert saved["steps"] == 30 and saved["tokens"] == 30 * 8 * 64
    # ppl = exp(val_loss) in Python doubles, both sides: equal to ~1 ulp (2e-16).
    assert math.isclose(saved["final_val_ppl"], math.exp(saved["final_val_loss"]), rel_tol=1e-9)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    for r in train:
        assert {"loss", "lr", "grad_norm", "tokens_per_second", "tokens", "frac"} <= set(r)
        assert r["tokens"] == r["step"] * 8 * 64 and r["frac"] == r["step"] / 30
    # Warmup then cosine decay to 10% of the peak.
    # Megatron's schedule: the first update uses the warmup's initial lr 0, the peak is reached
    # after warmup, and the cosine ends at 10% of the peak.
    lrs = [r["lr"] for r in train]
    # The scheduler computes lr in doubles (a few ulps off 3e-3); a wrong warmup or peak moves
    # it by >= 1/warmup_steps relative, far above 1e-6.
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3, rel=1e-6)
    peak = lrs.index(max(lrs))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    assert min(lrs[peak:]) >= 3e-4 * (1 - 1e-9) and lrs[-1] < 3.1e-4
    # The repeated-motif stream is learnable: validation loss falls well below chance (ln 64).
    assert evals[0]["val_loss"] > 3.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    full = tiny(tmp_path, "full")
    train_from_config(full)
    part = tiny(tmp_path, "part", "training.exit_after_steps=5")
    train_from_config(part)
    assert (tmp_path / "part" / "checkpoints" / "latest").read_text().strip() == "iter_0000005"
    assert not (tmp_path / "part" / "summary.json").exists()
    train_from_config(tiny(tmp_path, "part"))  # relaunch without the stop: resumes at step 5
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    strip = ("tokens_per_second", "step_seconds", "tflops_per_gpu", "mfu", "peak_memory_gib")
    a = [{k: v for k, v in r.items() if k not in strip} for r in a]
    b = [{k: v for k, v in r.items() if k not in strip} for r in b]
    assert a == b  # bitwise-equal losses, grad norms, lrs and eval losses
    sa = json.loads((tmp_path / "full" / "summary.json").read_text())
    sb = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert sa == sb


def test_resume_refuses_a_different_recipe(tmp_path):
    from megatron_qk.config.errors import ConfigError

    train_from_config(tiny(tmp_path, "r", "training.exit_after_steps=2"))
    with pytest.raises(ConfigError, match="optim.lr"):
        train_from_config(tiny(tmp_path, "r", "optim.lr=1e-2"))


def test_non_finite_loss_stops_with_checkpoint_intact(tmp_path, monkeypatch):
    import megatron_qk.training.losses as losses

    real = losses.global_loss
    calls = {"n": 0}

    def poisoned(loss_dicts, info, device):
        value = real(loss_dicts, info, device)
        calls["n"] += 1
        # The 0th eval takes 2 calls; train steps 1-4 follow, then 2 eval calls at step 4.
        return float("nan") if calls["n"] == 9 else value

    monkeypatch.setattr(losses, "global_loss", poisoned)
    # Diagnostics off: their held-out pass would add a _global_loss call to every evaluation.
    cfg = tiny(tmp_path, "nan", "training.save_interval=2", "diagnostics.enabled=false")
    with pytest.raises(SystemExit) as exc:
        train_from_config(cfg)
    assert exc.value.code == 3
    ckpts = tmp_path / "nan" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000004"
    assert not (tmp_path / "nan" / "summary.json").exists()
    last = read_metrics(tmp_path / "nan")[-1]
    assert math.isfinite(last.get("loss", last.get("val_loss")))


def _cli_train(tmp_path: Path, name: str, nproc: int, *overrides: str) -> list[dict]:
    import subprocess
    import sys

    run_dir = tmp_path / name
    cmd = [
        sys.executable,
        "-m",
        "megatron_qk.cli",
        "train",
        "tiny",
        "--nproc-per-node",
        str(nproc),
        "--set",
        f"training.output_dir={run_dir}",
        "--set",
        "training.train_steps=6",
        "--set",
        "training.eval_interval=3",
        "--set",
        "logging.progress_bar=false",
    ]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return read_metrics(run_dir)


# The paper's rule on upper-half W_Q/W_K with a window that lets maturity fire at the step-3
# evaluation of a 6-step run, so layouts must agree on selection, diagnostics and release.
UPPER_QK = (
    "optim.rules=[{name: upper_qk, threshold: 0.01, patience: 1, min_frac: 0.4, "
    "max_frac: 0.9, ramp_frac: 0.34}]"
)

# Exactly 3 held-out diagnostic sequences in every layout: not a multiple of the micro-batch (4)
# or of micro-batch x DP (8), so DP=1 pads its one micro-batch and DP=2 leaves rank 1 all padding.
# Rounding up instead would read 4 sequences at DP=1 and 8 at DP=2, and the diag values differ.
DIAG_8 = "diagnostics.num_sequences=3"


@pytest.fixture(scope="module")
def single_process_ref(tmp_path_factory):
    return _cli_train(tmp_path_factory.mktemp("ref"), "ref", 1, UPPER_QK, DIAG_8)


@pytest.mark.parametrize(
    "layout",
    [
        ("parallel.use_distributed_optimizer=true",),
        ("parallel.tensor_model_parallel_size=2", "model.vocab_pad_multiple=64"),
        ("parallel.pipeline_model_parallel_size=2",),
    ],
    ids=["dp2-distopt", "tp2", "pp2"],
)
def test_two_process_layouts_match_single_process(tmp_path, single_process_ref, layout):
    """torchrun with 2 real gloo processes gives the single-process losses.

    Tolerance 1e-4 relative: the layouts sum the same fp32 numbers in a different order
    (reduce-scatter / TP all-reduce / p2p), which moves the last bits each step.
    """
    ref = single_process_ref
    got = _cli_train(tmp_path, "two", 2, UPPER_QK, DIAG_8, *layout)
    assert [r["kind"] for r in got] == [r["kind"] for r in ref]
    keys = {
        "train": ("loss", "mult/upper_qk"),
        "eval": ("val_loss",),
        "diag": (
            "lower_copy",
            "lower_copy_uniform",  # counted once per sequence in every layout
            "maturity_score",
            "upper_entropy",
            "upper_logit",
            "logit_ratio",
            "upper_ffn_write_rms",
            "upper_qk_sigma",
        ),
        "release": ("step", "reason"),
    }
    for a, b in zip(ref, got):
        for key in keys[a["kind"]]:
            want = a[key] if isinstance(a[key], str) else pytest.approx(a[key], rel=1e-4)
            assert b[key] == want, (key, a, b)
    # Per-layer and per-head values, with heads under their global index (TP shards them).
    for a, b in zip(ref, got):
        if a["kind"] != "diag":
            continue
        assert a["sequences"] == b["sequences"] == 3
        for layer, want in a["layers"].items():
            have = b["layers"][layer]
            assert have["ffn_write_rms"] == pytest.approx(want["ffn_write_rms"], rel=1e-4)
            assert set(have["heads"]) == set(want["heads"]), layer
            for stat, values in want["heads"].items():
                assert have["heads"][stat] == pytest.approx(values, rel=1e-4, abs=1e-7), (
                    layer,
                    stat,
                )
        assert b["upper_qk_displacement"] == pytest.approx(
            a["upper_qk_displacement"], rel=1e-4, abs=1e-7
        )
    releases = [(r["rule"], r["reason"], r["step"]) for r in ref if r["kind"] == "release"]
    assert releases == [("upper_qk", "maturity", 3)]
    # Released after step 3; the ramp (2 steps) starts from the multiplier at the release step.
    assert [r["mult/upper_qk"] for r in ref if r["kind"] == "train"] == pytest.approx(
        [0.25, 0.25, 0.25, 0.25, 0.625, 1.0]
    )
    if layout[0].startswith(("parallel.tensor", "parallel.pipeline")):
        # The checkpoint written under TP=2 / PP=2 exports with our logits (tests/test_export.py).
        from export_checks import assert_hf_export_matches, assert_megatron_export_matches

        assert_hf_export_matches(tmp_path / "two", tmp_path / "hf")
        assert_megatron_export_matches(tmp_path / "two", tmp_path / "mcore")


def _preprocessed_prefix(tmp_path: Path, num_docs: int) -> Path:
    """Real GPT-2 BPE tokens of ``num_docs`` Python docstrings, via our preprocessing pipeline."""
    from data_fixtures import pydoc_docs, run_preprocess, text_records, write_jsonl

    docs = pydoc_docs(num_docs)
    assert len(docs) == num_docs
    src = write_jsonl(tmp_path / "docs.jsonl", text_records(docs))
    prefix = tmp_path / "corpus"
    run_preprocess(prefix, [src])
    # Megatron-LM naming: the tool appends the JSON key and the "document" level.
    return tmp_path / "corpus_text_document"


def test_trains_on_megatron_indexed_dataset(tmp_path):
    """GPTDataset through BlendedMegatronDatasetBuilder on a .bin/.idx our tool wrote."""
    prefix = _preprocessed_prefix(tmp_path, 60)
    cfg = tiny(
        tmp_path,
        "indexed",
        "data.kind=indexed",
        f"data.train_prefixes=[{prefix}]",
        "data.split=90,10,0",
        "training.train_steps=8",
    )
    summary = train_from_config(cfg)
    records = read_metrics(tmp_path / "indexed")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    # Real English BPE tokens on a fresh model: loss starts near ln(50304) and falls.
    assert abs(losses[0] - math.log(50304)) < 0.5
    assert losses[-1] < losses[0]
    assert math.isfinite(summary["final_val_loss"])


def test_split_with_an_empty_share_is_refused(tmp_path):
    from megatron_qk.config.errors import ConfigError

    prefix = _preprocessed_prefix(tmp_path, 5)
    cfg = tiny(
        tmp_path,
        "empty",
        "data.kind=indexed",
        f"data.train_prefixes=[{prefix}]",
        "data.split=99,1,0",
    )
    with pytest.raises(ConfigError, match=r"data\.split.*valid share.*5 documents"):
        train_from_config(cfg)
    assert not (tmp_path / "empty" / "metrics.jsonl").exists()


def test_evaluation_runs_without_dropout(tmp_path):
    """Validation loss and diag probes see the model in eval mode: repeatable with dropout on."""
    from megatron_qk.training.distributed import setup_distributed, teardown_distributed
    from megatron_qk.training.loop import Trainer

    cfg = tiny(tmp_path, "dropout", "model.hidden_dropout=0.3", "model.attention_dropout=0.3")
    trainer = Trainer(cfg, setup_distributed(cfg))
    try:
        first, second = trainer.evaluate(), trainer.evaluate()
        assert first["val_loss"] == second["val_loss"]
        assert trainer.model.training  # back in train mode for the next step
    finally:
        teardown_distributed()
