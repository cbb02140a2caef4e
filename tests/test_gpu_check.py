"""tools/gpu_check.sh and its Python driver, exercised on the CPU (``--dry-run``, fake steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))  # benchmarks

import gpu_check  # noqa: E402


def test_suite_runs_on_the_cpu_even_on_a_gpu_host():
    """conftest hides CUDA unless MQK_TEST_GPU=1, so auto resolves to fp32/local/gloo."""
    assert os.environ.get("MQK_TEST_GPU") != "1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()


def test_driver_dry_run_runs_every_check(tmp_path):
    """Every check on the CPU; the step-time target is set unreachable, so its failing branch
    runs too: the driver must report exactly that check and exit 1."""
    out = tmp_path / "driver.json"
    argv = ["--dry-run", "--preset", "tiny", "--max-step-ratio", "1e-6", "--out", str(out)]
    rc = gpu_check.main(argv)
    results = {r["check"]: r for r in json.loads(out.read_text())}
    assert set(results) == set(gpu_check.CHECKS)
    errors = {k: r.get("error") for k, r in results.items() if r["ok"] is False}
    assert rc == 1 and set(errors) == {"step_time"} and errors["step_time"] is None, errors
    assert results["cuda1"]["ok"] is None and results["cuda1"]["skipped"]
    # Same weights, same (local) kernels on both sides in the dry run: identical outputs per
    # layer, after the weights were moved away from their initialisation.
    te_vs_local = results["te_vs_local"]
    assert te_vs_local["tensors_copied"] > 10 and te_vs_local["tensors_moved"] > 10
    assert set(te_vs_local["rel_diff"]) == {0.0} and te_vs_local["ok"] is True
    assert te_vs_local["negative_control"]["failed_as_it_must"] is True
    assert results["checkpoint_round_trip"]["max_rel_logit_diff"] == 0.0
    step = results["step_time"]
    assert step["ours_mfu"] > 0 and step["stock_mfu"] > 0 and step["ratio_ours_over_stock"] > 0
    assert step["max_ratio"] == 1e-6 and step["ok"] is False
    resume = results["resume"]
    assert resume["preempt"]["first_rc"] == 75 and resume["preempt"]["ok"] is True, resume
    assert resume["tp2_sp_skipped"]


def test_resume_judge_fails_each_kind_of_difference():
    """benchmarks/resume_equality.py --enforce: the failing branches on made-up results."""
    from benchmarks.resume_equality import judge, layout_tolerance

    good = {"first_rc": 75, "resume_rc": 0, "same_lines": True, "max_rel_diff": 0.0}
    assert judge("preempt", good, noise=0.0)["ok"] is True
    assert "exit codes" in judge("preempt", {**good, "first_rc": 0}, 0.0)["why"]
    assert "lines" in judge("preempt", {**good, "same_lines": False}, 0.0)["why"]
    assert "max_rel_diff" in judge("preempt", {**good, "max_rel_diff": 1e-7}, 0.0)["why"]
    assert judge("preempt", {**good, "max_rel_diff": 1e-7}, noise=1e-7)["ok"] is True
    tp = {**good, "first_rc": 0, "max_rel_diff": layout_tolerance() / 2}
    assert judge("tp2_sp", tp, 0.0)["ok"] is True
    assert judge("tp2_sp", {**tp, "max_rel_diff": 2 * layout_tolerance()}, 0.0)["ok"] is False


def test_merge_reports_missing_and_broken_outputs(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"check": "x", "ok": True}]))
    (tmp_path / "b.json").write_text("")
    (tmp_path / "c.json").write_text("{not json")
    (tmp_path / "d.json").write_text(json.dumps({"benchmark": "rule_step_time", "ratio": 1.0}))
    summary = gpu_check.merge([tmp_path / n for n in ("a.json", "b.json", "c.json", "d.json")])
    assert summary["failed"] == ["b", "c"]
    assert [c["check"] for c in summary["checks"]] == ["x", "b", "c", "rule_step_time"]


def test_gpu_check_sh_runs_every_step_and_prints_one_summary(tmp_path):
    """The shell plumbing with a stand-in interpreter: each step's JSON reaches the summary."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = tools/gpu_check.py ] && [ "$2" = --merge ]; then\n'
        f'  exec {sys.executable} "$@"\n'
        "fi\n"
        'case "$*" in\n'
        '  *"-m pytest"*) echo "3 passed in 1.0s";;\n'
        '  *tools/gpu_check.py*) echo \'[{"check": "te_vs_local", "ok": true}]\';;\n'
        '  *rule_step_time*) echo \'{"benchmark": "rule_step_time", "ratio": 1.0}\';;\n'
        "  *diag_overhead*) exit 3;;\n"
        "esac\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(
        ["bash", str(ROOT / "tools/gpu_check.sh")], env=env, capture_output=True, text=True
    )
    summary = json.loads(proc.stdout)
    checks = [c["check"] for c in summary["checks"]]
    assert checks == ["pytest_gpu", "te_vs_local", "rule_step_time", "diag_overhead"], proc.stderr
    assert summary["checks"][0]["ok"] is True and "3 passed" in summary["checks"][0]["result"]
    assert summary["failed"] == ["diag_overhead"] and proc.returncode == 1
    assert "diag_overhead exited 3" in proc.stderr
