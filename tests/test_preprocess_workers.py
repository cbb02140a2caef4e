"""The worker pool is bounded by the usable CPUs and the input, and dies with its parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_fixtures import pydoc_docs, run_preprocess, same_files, text_records, write_jsonl
from preprocess_signals import PausedRun, alive, children, cmdline

from megatron_qk.data.readers import resolve_inputs
from megatron_qk.data.workers import cgroup_cpu_limit, plan_workers, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _fake_proc(tmp_path: Path, mount: str, cgroup: str) -> Path:
    proc = tmp_path / "proc_self"
    proc.mkdir()
    (proc / "mountinfo").write_text(
        "22 1 0:20 / /proc rw,nosuid - proc proc rw\n" + mount + "\n", encoding="utf-8"
    )
    (proc / "cgroup").write_text(cgroup + "\n", encoding="utf-8")
    return proc


def test_cgroup_v2_quota_of_the_cgroup_or_an_ancestor(tmp_path):
    root = tmp_path / "cg2"
    (root / "job" / "step").mkdir(parents=True)
    (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
    (root / "job" / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs for the whole job
    (root / "cpu.max").write_text("max 100000\n")
    proc = _fake_proc(
        tmp_path, f"41 31 0:38 / {root} rw,relatime - cgroup2 cgroup2 rw", "0::/job/step"
    )
    assert cgroup_cpu_limit(proc) == 1.5
    cpus, how = usable_cpus(proc)
    assert cpus == min(AFFINITY, 2) and "cgroup CPU quota 1.5" in how


def test_cgroup_v1_cfs_quota(tmp_path):
    root = tmp_path / "cpu,cpuacct"
    job = root / "slurm" / "job_7"
    job.mkdir(parents=True)
    (job / "cpu.cfs_quota_us").write_text("100000\n")
    (job / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu.cfs_period_us").write_text("100000\n")
    mount = f"32 31 0:29 / {root} rw,relatime - cgroup cgroup rw,cpu,cpuacct"
    proc = _fake_proc(tmp_path, mount, "4:cpu,cpuacct:/slurm/job_7")
    assert cgroup_cpu_limit(proc) == 1.0
    assert usable_cpus(proc)[0] == 1


def test_no_quota_means_the_affinity(tmp_path):
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cpu.max").write_text("max 100000\n")
    proc = _fake_proc(tmp_path, f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw", "0::/")
    assert cgroup_cpu_limit(proc) is None
    assert usable_cpus(proc) == (AFFINITY, f"affinity {AFFINITY}, no cgroup CPU quota")


def test_plan_caps_at_cpus_and_batches_and_says_so(tmp_path):
    tiny = write_jsonl(tmp_path / "tiny.jsonl", text_records(["one", "two", "three"]))
    workers, note = plan_workers(8, resolve_inputs([str(tiny)]), chunk_bytes=1 << 19)
    assert workers == 1 and "--workers 8 lowered to 1" in note and "at most 1 batch" in note
    big = write_jsonl(tmp_path / "big.jsonl", text_records(pydoc_docs() * 3))
    workers, note = plan_workers(100_000, resolve_inputs([str(big)]), chunk_bytes=1 << 19)
    assert workers <= usable_cpus()[0] <= AFFINITY and "--workers 100,000 lowered" in note
    assert plan_workers(1, resolve_inputs([str(big)]), chunk_bytes=1 << 19) == (1, None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers")
    path = write_jsonl(d / "small.jsonl", text_records(pydoc_docs() * 6))
    run_preprocess(d / "ref", [path], workers=1)
    return path, d / "ref_text_document"


def _cli(corpus: Path, prefix: Path, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_qk.cli", "preprocess", "--input", str(corpus)]
    return cmd + ["--output-prefix", str(prefix), "--no-progress", "--workers", str(workers)]


def _pool_workers(pid: int) -> list[int]:
    return [c for c in children(pid) if "spawn_main" in cmdline(c)]


def test_workers_100000_starts_at_most_the_usable_cpus_and_finishes(tmp_path, corpus):
    path, reference = corpus
    held = PausedRun(_cli(path, tmp_path / "held", 100_000), "workers_started")
    try:
        started = _pool_workers(held.pid)
        assert 1 <= len(started) <= usable_cpus()[0] <= AFFINITY, started
        assert "--workers 100,000 lowered to" in held.stderr
    finally:
        held.kill()

    done = subprocess.run(_cli(path, tmp_path / "run", 100_000), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("lowered to") == 1
    summary = json.loads(Path(f"{tmp_path / 'run'}_summary.json").read_text())
    assert summary["workers_requested"] == 100_000 and summary["workers"] <= AFFINITY
    assert same_files(f"{tmp_path / 'run'}_text_document", reference)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_killing_the_parent_leaves_no_worker(tmp_path, corpus):
    path, _ = corpus
    held = PausedRun(_cli(path, tmp_path / "kill", 2), "workers_started")
    descendants = children(held.pid)  # the pool workers and multiprocessing's resource tracker
    try:
        assert _pool_workers(held.pid), descendants
        held.proc.send_signal(signal.SIGKILL)  # the parent only, not its process group
        # Not held.wait(): surviving workers would keep its stderr pipe open.
        assert held.proc.wait(timeout=300) == -signal.SIGKILL
        deadline = time.monotonic() + 120  # a bound for a loaded machine, not a timing claim
        while any(alive(p) for p in descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = {p: cmdline(p) for p in descendants if alive(p)}
        assert not survivors, f"processes outlived their killed parent: {survivors}"
    finally:
        for p in descendants:
            if alive(p):
                os.kill(p, signal.SIGKILL)
