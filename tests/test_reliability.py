"""Faults and bad inputs around a training run: the run-directory lock, refusing to mix runs,
preemption, orphaned children, preflight, damaged data, and the smaller hardening items.

Most tests stop before any model is built, so they take well under a second; the preemption
test trains the tiny preset in a subprocess for a few steps.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env

from megatron_qk.config.loader import load_config
from megatron_qk.data.indexed import write_indexed_dataset
from megatron_qk.data.validate import DataFileError, check_indexed_dataset
from megatron_qk.rundir.lock import RunDirBusyError, RunDirLock
from megatron_qk.rundir.previous import move_run_aside
from megatron_qk.training.preflight import PreflightError, preflight

PY = sys.executable


def tiny(tmp_path: Path, *overrides: str, name: str = "run"):
    return load_config(
        "tiny",
        [
            f"training.output_dir={tmp_path / name}",
            "training.train_steps=2",
            "training.eval_interval=2",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *overrides,
        ],
    )


def _env() -> dict:
    return subprocess_env()


# -- item 2: one training per run directory ---------------------------------------------------
def test_second_lock_holder_is_refused_naming_host_and_pid(tmp_path):
    with RunDirLock(tmp_path / "run"):
        with pytest.raises(RunDirBusyError, match=rf"host=\S+ pid={os.getpid()} "):
            RunDirLock(tmp_path / "run").acquire()
    with RunDirLock(tmp_path / "run") as again:  # released on exit: free again
        assert again.held


def test_lock_dies_with_a_killed_holder(tmp_path):
    holder = subprocess.Popen(
        [
            PY,
            "-c",
            "import sys, time; from megatron_qk.rundir.lock import RunDirLock; "
            f"lock = RunDirLock({str(tmp_path / 'run')!r}); lock.acquire(); "
            "print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=f"pid={holder.pid}"):
            RunDirLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunDirLock(tmp_path / "run") as lock:  # no stale lock after SIGKILL
        assert lock.held


def test_training_into_a_locked_run_directory_exits_before_building(tmp_path, monkeypatch):
    from megatron_qk.training import entry

    monkeypatch.setattr(entry, "setup_distributed", lambda cfg: pytest.fail("built anyway"))
    with RunDirLock(tmp_path / "run"):
        with pytest.raises(RunDirBusyError, match=f"pid={os.getpid()}"):
            entry.train_from_config(tiny(tmp_path))


# -- item 3: never delete or mix a run ----------------------------------------------------------
def _old_run(run_dir: Path) -> dict[str, bytes]:
    (run_dir / "checkpoints" / "iter_0000005").mkdir(parents=True)
    files = {
        "config.yaml": b"name: old\n",
        "metrics.jsonl": b"".join(b'{"kind": "train", "step": %d}\n' % i for i in range(1, 64)),
        "summary.json": b'{"steps": 63}\n',
        "checkpoints/latest": b"iter_0000005\n",
    }
    for name, data in files.items():
        (run_dir / name).write_bytes(data)
    return files


def test_fresh_start_over_an_old_run_is_refused_and_changes_nothing(tmp_path, monkeypatch):
    from megatron_qk.training import entry

    files = _old_run(tmp_path / "run")
    monkeypatch.setattr(entry, "setup_distributed", lambda cfg: pytest.fail("built anyway"))
    with pytest.raises(PreflightError, match="training.resume: .*--overwrite") as exc:
        entry.train_from_config(tiny(tmp_path, "training.resume=false"))
    assert exc.value.path == "training.resume"
    for name, data in files.items():
        assert (tmp_path / "run" / name).read_bytes() == data


def test_overwrite_moves_the_old_run_aside_intact(tmp_path):
    run_dir = tmp_path / "run"
    files = _old_run(run_dir)
    with RunDirLock(run_dir):  # the caller keeps its lock across the move
        moved = move_run_aside(run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]
    assert moved.parent == tmp_path and moved.name.startswith("run.prev-")
    for name, data in files.items():
        assert (moved / name).read_bytes() == data
    assert move_run_aside(run_dir) != moved  # a second move gets its own name


# -- item 4: preemption and orphans -----------------------------------------------------------
def _train_cmd(run_dir: Path, *extra: str, steps: int = 400) -> list[str]:
    cmd = [PY, "-m", "megatron_qk.cli", "train", "tiny", *extra]
    for item in (
        f"training.output_dir={run_dir}",
        f"training.train_steps={steps}",
        "training.eval_interval=0",
        "diagnostics.enabled=false",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    ):
        cmd += ["--set", item]
    return cmd


def _start_held(cmd: list[str], tmp_path: Path, step: int, ranks: int = 1, signals: int = 1):
    """Start a training that holds after ``step`` until it has received ``signals`` signals
    (training/callbacks/hold.py), and return once every rank is holding: the signal sent next
    arrives at that known point, never racing the work."""
    ready = tmp_path / "held"
    env = _env()
    env.update(
        MQK_FAULT_HOLD_AT_STEP=str(step),
        MQK_FAULT_HOLD_READY=str(ready),
        MQK_FAULT_HOLD_SIGNALS=str(signals),
    )
    # Its own session: a signal to its process group is a terminal's Ctrl-C, and spares pytest.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    expected = {f"held-rank{r}" for r in range(ranks)}
    deadline = time.monotonic() + 600
    while not (ready.is_dir() and expected <= {p.name for p in ready.iterdir()}):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never reached step {step}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    return proc


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigusr1_finishes_the_step_saves_and_exits_75(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_held(_train_cmd(run_dir), tmp_path, step=2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    records = _records(run_dir)
    last = records[-1]
    assert last["kind"] == "event" and last["event"] == "preempted"
    assert last["signal"] == "SIGUSR1" and last["step"] == 2
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "iter_0000002" and last["checkpoint"].endswith(latest)
    assert max(r["step"] for r in records if r["kind"] == "train") == 2
    assert "SIGUSR1 received: stopped after step 2" in err


def test_ctrl_c_finishes_the_step_saves_and_exits_130_without_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_held(_train_cmd(run_dir), tmp_path, step=3)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
    last = _records(run_dir)[-1]
    assert (last["event"], last["signal"], last["step"]) == ("preempted", "SIGINT", 3)
    assert "interrupted at step 3, checkpoint saved; run the same command to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def test_second_ctrl_c_stops_at_once_without_saving_or_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    # Held until two signals: the second Ctrl-C arrives while the run still holds at step 2.
    proc = _start_held(_train_cmd(run_dir), tmp_path, step=2, signals=2)
    os.killpg(proc.pid, signal.SIGINT)
    first_lines = []
    for line in proc.stderr:  # the first Ctrl-C has been handled once it says so
        first_lines.append(line)
        if "Ctrl-C again stops at once" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    err = "".join(first_lines) + err
    assert proc.returncode == -signal.SIGINT, err[-3000:]  # the shell reports 130
    assert not (run_dir / "checkpoints" / "latest").exists()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def test_ctrl_c_under_torchrun_stops_both_ranks_at_one_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cmd = _train_cmd(run_dir, "--nproc-per-node", "2")
    proc = _start_held(cmd, tmp_path, step=2, ranks=2)
    os.killpg(proc.pid, signal.SIGINT)  # launcher and both workers, as from a terminal
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    assert "interrupted at step 2, checkpoint saved; run the same command to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def test_preemption_watch_reports_sigterm_and_restores_handlers():
    from megatron_qk.training.preemption import PreemptionWatch

    before = signal.getsignal(signal.SIGTERM)
    watch = PreemptionWatch()
    assert watch.install()
    try:
        assert watch.poll(__import__("torch").device("cpu")) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.poll(__import__("torch").device("cpu")) == "SIGTERM"
    finally:
        watch.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_torchrun_launcher_passes_on_the_preempted_exit_code(monkeypatch):
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from megatron_qk.training.torchrun import run_torchrun

    def failing(code):
        def main(argv):
            failure = ProcessFailure(local_rank=0, pid=1, exitcode=code, error_file="<none>")
            raise ChildFailedError("train", {0: failure})

        return main

    monkeypatch.setattr(torchrun, "main", failing(75))
    assert run_torchrun([]) == 75
    monkeypatch.setattr(torchrun, "main", failing(1))
    with pytest.raises(ChildFailedError):
        run_torchrun([])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_forked_children_die_with_the_trainer():
    script = (
        "import multiprocessing as mp, os, signal, time\n"
        "from megatron_qk.training.child_processes import make_forked_children_die_with_parent\n"
        "make_forked_children_die_with_parent()\n"
        "p = mp.get_context('fork').Process(target=time.sleep, args=(120,))\n"
        "p.start(); print(p.pid, flush=True); time.sleep(0.5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, env=_env())
    child = int(proc.stdout.split()[0])
    try:
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the forked child outlived its killed parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


# -- item 6: preflight ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.rules=[{name: upper_qk, layers: '3-9'}]", "optim.rules[0].layers"),
        ("optim.rules=[{name: upper_qk, threshold: -0.1}]", "optim.rules[0].threshold"),
        ("data.kind=indexed", "data.train_prefixes[0]"),
        ("training.output_dir=UNDER_A_FILE", "training.output_dir"),
        ("logging.wandb=offline", "logging.wandb"),
    ],
)
def test_preflight_names_the_key_of_each_bad_input(tmp_path, monkeypatch, override, key):
    import importlib.util

    from megatron_qk.training import preflight as pf

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        pf.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a),
    )
    (tmp_path / "file").write_text("x")
    override = override.replace("UNDER_A_FILE", str(tmp_path / "file" / "run"))
    extra = [f"data.train_prefixes=[{tmp_path / 'missing'}]"] if "indexed" in override else []
    cfg = tiny(tmp_path, override, *extra)
    with pytest.raises(PreflightError) as exc:
        preflight(cfg, world_size=1)
    assert [p.path for p in exc.value.problems] == [key]
    assert str(exc.value).startswith(key)


def test_preflight_collects_every_problem_and_a_good_recipe_passes(tmp_path):
    preflight(tiny(tmp_path), world_size=1)
    cfg = tiny(
        tmp_path,
        "optim.rules=[{name: upper_qk, layers: '3-9', threshold: -1.0}]",
    )
    with pytest.raises(PreflightError, match="2 problems") as exc:
        preflight(cfg, world_size=1)
    assert {p.path for p in exc.value.problems} == {
        "optim.rules[0].layers",
        "optim.rules[0].threshold",
    }


def test_dry_run_fails_on_a_bad_rule_before_building(tmp_path, capsys, monkeypatch):
    import argparse

    from megatron_qk.cli import train as train_cli
    from megatron_qk.training import entry

    monkeypatch.setattr(entry, "dry_run", lambda cfg: pytest.fail("model built"))
    parser = argparse.ArgumentParser()
    train_cli.configure_parser(parser)
    args = parser.parse_args(
        ["tiny", "--dry-run", "--set", f"training.output_dir={tmp_path / 'r'}"]
        + ["--set", "optim.rules=[{name: upper_qk, layers: '3-9'}]"]
    )
    assert train_cli.run(args) == 2
    assert "optim.rules[0].layers: '3-9': '3-9' is outside layers 1..4" in capsys.readouterr().err


# -- item 7: damaged data ---------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path) -> str:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=int(rng.integers(50, 400))) for _ in range(40)]
    prefix = str(tmp_path / "d_text_document")
    write_indexed_dataset(prefix, docs, np.uint16)
    return prefix


def test_intact_dataset_passes(dataset):
    check_indexed_dataset(dataset, vocab_size=1000)


@pytest.mark.parametrize("delta", [-200, -2, 2])
def test_bin_size_must_match_the_index(dataset, delta):
    path = Path(dataset + ".bin")
    data = path.read_bytes()
    path.write_bytes(data[:delta] if delta < 0 else data + b"\0" * delta)
    with pytest.raises(DataFileError, match=rf"{path.name} is {len(data) + delta} bytes but"):
        check_indexed_dataset(dataset, vocab_size=1000, scan_tokens=False)


def test_token_ids_outside_the_vocabulary_name_the_file(dataset):
    path = Path(dataset + ".bin")
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[1234] = 1000  # one id past the vocabulary
    tokens.tofile(path)
    with pytest.raises(DataFileError, match=rf"{path.name}: token 1000 at token offset 1234"):
        check_indexed_dataset(dataset, vocab_size=1000)
    check_indexed_dataset(dataset, vocab_size=1000, scan_tokens=False)  # the flag skips it
    check_indexed_dataset(dataset, vocab_size=1001)


def test_preflight_rejects_random_bytes_under_a_valid_index(tmp_path, dataset):
    path = Path(dataset + ".bin")
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))
    base = ["data.kind=indexed", f"data.train_prefixes=[{dataset}]", "model.vocab_size=1000"]
    with pytest.raises(PreflightError, match=r"data.train_prefixes\[0\]: .*outside the model"):
        preflight(tiny(tmp_path, *base), world_size=1)
    preflight(tiny(tmp_path, *base, "data.check_token_ids=false"), world_size=1)


# -- item 8: smaller ones ---------------------------------------------------------------------
def test_failed_checkpoint_write_says_disk_and_resume_point(tmp_path):
    from megatron_qk.training.save_errors import save_failure_message

    exc = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed")
    tmp = tmp_path / "checkpoints" / "iter_0000010.tmp"
    tmp.mkdir(parents=True)
    latest = tmp_path / "checkpoints" / "iter_0000005"
    text = save_failure_message(tmp, latest, exc)
    assert str(tmp) in text and "MiB free" in text and "disk is full" in text
    assert f"{latest} is intact" in text and "inline_container" in text


def test_checkpoint_write_failure_raises_the_explained_error(tmp_path, monkeypatch):
    from megatron_qk.training import checkpoint as ckpt
    from megatron_qk.training.save_errors import CheckpointSaveError

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(ckpt, "_write_checkpoint_files", disk_full)
    monkeypatch.setattr(ckpt, "_model_sharded_state_dict", lambda chunks: {})

    class _Optimizer:
        def sharded_state_dict(self, *a, **k):
            return {}

    state = ckpt.TrainState(step=3, consumed_samples=24, scheduler={}, extra={})
    with pytest.raises(CheckpointSaveError, match="iter_0000003.tmp failed .*MiB free"):
        ckpt.save_checkpoint(tmp_path / "checkpoints", [], _Optimizer(), state)
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_non_logging_ranks_do_not_repeat_log_lines(caplog):
    import logging

    from megatron_qk.training.sinks import ProgressBar

    with caplog.at_level(logging.INFO, logger="megatron_qk.training.sinks"):
        ProgressBar(False, total=3, initial=0, desc="x", log_lines=False).write("rank 1 line")
        ProgressBar(False, total=3, initial=0, desc="x").write("rank 0 line")
    assert [r.getMessage() for r in caplog.records] == ["rank 0 line"]


def test_progress_bar_is_throttled_when_stderr_is_not_a_terminal(monkeypatch):
    import io

    from megatron_qk.training.sinks import ProgressBar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = ProgressBar(True, total=1000, initial=0, desc="x")
    try:
        assert bar.interval == 30.0
    finally:
        bar.close()


def test_strict_preprocessing_does_not_advise_a_rerun_that_fails_again(tmp_path, caplog):
    from megatron_qk.data.pipeline import _commit_after_error

    class _Run:
        class state:  # noqa: N801 - a stand-in namespace
            total_documents, total_tokens = 3, 30

        work = type("W", (), {"path": tmp_path})

        def commit(self):
            pass

    _commit_after_error(_Run(), strict_stop=True)
    _commit_after_error(_Run())
    strict, interrupted = [r.getMessage() for r in caplog.records]
    assert "stops at the same record" in strict and "without --strict" in strict
    assert "running the same command again continues" in interrupted


def test_slurm_script_requests_the_signal_and_requeues_a_preempted_run(tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = root / "examples" / "launch" / "train_slurm.sh"
    assert "#SBATCH --signal=USR1@120" in script.read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/srun.args\nexit 75\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = _env()
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        CONFIG="tiny",
        NODES="1",
        GPUS_PER_NODE="1",
        SLURM_JOB_ID="4242",
        OUTPUT_DIR=str(tmp_path / "run"),
        PYTHON=PY,
    )
    env.pop("SLURM_JOB_NODELIST", None)
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "-m megatron_qk.training.torchrun" in (tmp_path / "srun.args").read_text()
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]


def test_replay_of_a_log_cut_before_its_release_line_does_not_claim_disagreement(tmp_path):
    from test_analysis_replay import RULE, scores, write_run

    from megatron_qk.analysis.replay_format import format_report
    from megatron_qk.analysis.replay_log import replay_run

    path = write_run(tmp_path / "run", scores(40, 2, high_from=8), 40, None, RULE)
    # Cut the log right after the diag line of step 10, where the rule releases.
    lines = path.read_text().splitlines()
    cut = max(i for i, x in enumerate(lines) if json.loads(x)["step"] == 10)
    path.write_text("".join(x + "\n" for x in lines[: cut + 1]))
    result = replay_run(path)
    assert result["replayed"]["step"] == 10 and result["logged"] is None
    assert result["agrees"] is None and result["log_ends_at_release"] is True
    assert "no comparison possible" in format_report(result)
    # A complete log without the release line still disagrees.
    full = write_run(tmp_path / "full", scores(40, 2, high_from=8), 40, None, RULE)
    assert replay_run(full)["agrees"] is False


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("apex") is not None
    or __import__("torch").cuda.is_available(),
    reason="sequence parallelism is supported here",
)
def test_preflight_says_what_sequence_parallelism_needs(tmp_path):
    cfg = tiny(
        tmp_path,
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
    )
    with pytest.raises(PreflightError, match="parallel.sequence_parallel: needs the layer norms"):
        preflight(cfg, world_size=2)
    preflight(cfg, world_size=2, check_device=False)  # a dry run on a login node passes
