"""Layouts beyond two processes, and resuming under another layout, against one process.

Every run here is the tiny preset for 6 steps with the paper's rule set to release at the step-3
evaluation, launched through the real CLI (torchrun, gloo). Each test compares its metrics line
by line with the single-process run: losses, ``mult/`` values, diag values and the release step.

Tolerance: relative 1e-4. The layouts compute the same fp32 arithmetic with sums taken in another
order (TP all-reduce of partial products, DP reduce-scatter of gradients, pipeline stages, and
sharded optimizer steps). One reordered fp32 sum of n terms differs by at most ~n * 2^-24
relative (n <= 512 here: ~3e-5) and typically ~sqrt(n) * 2^-24 (~1e-6); six Adam steps carry
such differences forward without amplifying them past that scale, because Adam's update is
normalised by the gradient's own magnitude. Wrong sharding, a missing reduction or a wrong data
position moves the loss by more than 1e-2 (the 64-token repeat stream's loss falls by ~0.3 per
step early on), so 1e-4 separates the two by two orders of magnitude either way.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

REL = 1e-4
UPPER_QK = (
    "optim.rules=[{name: upper_qk, threshold: 0.01, patience: 1, min_frac: 0.4, "
    "max_frac: 0.9, ramp_frac: 0.34}]"
)
# 8 diagnostic sequences are the same samples at DP=1 (two rounds of 4) and DP=2 (one of 4 each).
DIAG_8 = "diagnostics.num_sequences=8"
# TP=2 pads the vocabulary to 64 x 2 = 128, the single-process default (128 x 1).
TP2 = ("parallel.tensor_model_parallel_size=2", "model.vocab_pad_multiple=64")
PP2 = ("parallel.pipeline_model_parallel_size=2",)
DIAG_KEYS = ("lower_copy", "upper_entropy", "upper_logit", "logit_ratio", "upper_ffn_write_rms")


def _train(run_dir: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_qk.cli", "train", "tiny", "--nproc-per-node", str(nproc)]
    for item in (
        f"training.output_dir={run_dir}",
        "training.train_steps=6",
        "training.eval_interval=3",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        UPPER_QK,
        DIAG_8,
        *overrides,
    ):
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] != "event"]


def assert_same_run(ref: list[dict], got: list[dict]) -> None:
    """Line-by-line agreement of two runs' metrics within :data:`REL`."""
    assert [r["kind"] for r in got] == [r["kind"] for r in ref]
    keys = {
        "train": ("loss", "mult/upper_qk"),
        "eval": ("val_loss",),
        "diag": DIAG_KEYS,
        "release": ("rule", "reason", "step"),
    }
    for a, b in zip(ref, got):
        assert b["step"] == a["step"]
        for key in keys[a["kind"]]:
            want = a[key] if isinstance(a[key], str | int) else pytest.approx(a[key], rel=REL)
            assert b[key] == want, (key, a, b)
        if a["kind"] == "diag":
            for layer, want in a["layers"].items():
                for stat, values in want["heads"].items():
                    # abs 1e-7: head copy scores near 0 carry absolute, not relative, rounding.
                    have = b["layers"][layer]["heads"][stat]
                    assert have == pytest.approx(values, rel=REL, abs=1e-7), (layer, stat)
    releases = [(r["rule"], r["reason"], r["step"]) for r in ref if r["kind"] == "release"]
    assert releases == [("upper_qk", "maturity", 3)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("ref") / "ref"
    _train(run_dir, 1)
    return _metrics(run_dir)


def test_resume_from_one_process_on_two_equals_the_uninterrupted_run(tmp_path, reference):
    """Saved at step 3 by one process, resumed by two (DP=2), distributed optimizer both times:
    dist-checkpointing reshards the optimizer state, the data position is in samples, and the
    changed layout re-seeds the RNG with a warning instead of failing on rng_rank1.pt."""
    run_dir = tmp_path / "run"
    distopt = "parallel.use_distributed_optimizer=true"
    _train(run_dir, 1, distopt, "training.exit_after_steps=3")
    proc = _train(run_dir, 2, distopt)
    assert "RNG states re-seeded" in proc.stderr
    assert_same_run(reference, _metrics(run_dir))


def test_tp2_by_pp2_on_four_processes_equals_one_process(tmp_path, reference):
    _train(tmp_path / "run", 4, *TP2, *PP2)
    assert_same_run(reference, _metrics(tmp_path / "run"))


def test_dp2_tp2_pp2_on_eight_processes_equals_one_process(tmp_path, reference):
    """All three dimensions at once, with the distributed optimizer. Sequence parallelism is not
    part of it: gloo has its collectives, but Megatron's torch LayerNorm (the norm without
    Transformer Engine or Apex) refuses it, and the preflight says so."""
    _train(tmp_path / "run", 8, *TP2, *PP2, "parallel.use_distributed_optimizer=true")
    assert_same_run(reference, _metrics(tmp_path / "run"))
