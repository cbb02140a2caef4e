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

import gpu_check  # noqa: E402


def test_suite_runs_on_the_cpu_even_on_a_gpu_host():
    """conftest hides CUDA unless MQK_TEST_GPU=1, so auto resolves to fp32/local/gloo."""
    assert os.environ.get("MQK_TEST_GPU") != "1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()


def test_driver_dry_run_runs_every_check(tmp_path):
    out = tmp_path / "driver.json"
    rc = gpu_check.main(["--dry-run", "--preset", "tiny", "--out", str(out)])
    results = {r["check"]: r for r in json.loads(out.read_text())}
    assert set(results) == set(gpu_check.CHECKS)
    errors = {k: r.get("error") for k, r in results.items() if r["ok"] is False}
    assert rc == 0 and not errors, errors
    assert results["cuda1"]["ok"] is None and results["cuda1"]["skipped"]
    # Same weights, same (local) kernels on both sides in the dry run: identical losses.
    assert results["te_vs_local"]["max_rel_diff"] == 0.0
    assert results["te_vs_local"]["tensors_copied"] > 10
    assert results["checkpoint_round_trip"]["max_rel_logit_diff"] == 0.0
    step = results["step_time"]
    assert step["ours_mfu"] > 0 and step["stock_mfu"] > 0 and step["ratio_ours_over_stock"] > 0


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
