"""Loss equality of interrupted runs against an uninterrupted one (prints JSON).

Runs of the tiny preset (6 steps, the paper's rule releasing at the step-3 evaluation,
diagnostics on 8 sequences), each through the real CLI:

- ``reference``: one process, uninterrupted, distributed optimizer;
- ``kill``: one process, SIGKILLed (whole process group) once step 3 is logged, with a checkpoint
  every 2 steps, then the same command rerun: it resumes from step 2;
- ``preempt``: one process sent SIGUSR1 once step 2 is logged (it saves and exits 75), then
  rerun;
- ``new_layout``: one process stopped at step 3 (``training.exit_after_steps``), resumed by two
  processes (DP=2);
- ``tp2``: the same, resumed by two processes as TP=2 (``model.vocab_pad_multiple=64`` in both
  launches, so the padded vocabulary is the same 50,304 rows under TP=1 and TP=2);
- ``pp2``: the same, resumed by two processes as PP=2 (two layers per stage).

- ``tp2_sp``: like ``tp2`` with sequence parallelism on in the resumed launch.

For each, the largest relative difference from the reference over every train loss, validation
loss and diag value, the release steps, and exit codes. Usage::

    python benchmarks/resume_equality.py [--out DIR] [--scenarios kill preempt new_layout tp2 pp2]
    python benchmarks/resume_equality.py --scenarios preempt --enforce   # tools/gpu_check.sh

``--enforce`` judges each scenario and exits 1 when one fails: the exit codes must be the
expected ones (a preempted launch exits 75, every other launch 0), the record lines must be the
reference's, and the values must agree. A resume on the same layout must be as close to the
reference as a second uninterrupted run is (``noise_rel_diff``: 0 where the kernels are
deterministic; TE is asked for deterministic ones: ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0``).
A resume on another TP layout reorders the reductions: it may differ by bf16 rounding, one unit
roundoff (2^-8) per training step after the resume (:func:`layout_tolerance`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = [
    "training.train_steps=6",
    "training.eval_interval=3",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "diagnostics.num_sequences=8",
    "parallel.use_distributed_optimizer=true",
    "optim.rules=[{name: upper_qk, threshold: 0.01, patience: 1, min_frac: 0.4, max_frac: 0.9, "
    "ramp_frac: 0.34}]",
]
KEYS = ("loss", "val_loss", "lower_copy", "upper_entropy", "upper_logit", "upper_ffn_write_rms")


def _cmd(run_dir: Path, nproc: int, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_qk.cli", "train", "tiny", "--nproc-per-node", str(nproc)]
    for item in (f"training.output_dir={run_dir}", *BASE, *extra):
        cmd += ["--set", item]
    return cmd


def _env() -> dict:
    launcher = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")  # TE: deterministic attention
    return env


#: Steps of the runs (``training.train_steps`` in BASE) and the step the layout scenarios stop at.
TRAIN_STEPS, STOP_STEP = 6, 3
BF16_UNIT_ROUNDOFF = 2.0**-8
#: The exit code of a launch that saved on SIGUSR1 and asks to be requeued.
PREEMPTED_RC = 75


def layout_tolerance() -> float:
    """Relative tolerance of a resume on another TP layout: one bf16 unit roundoff per step
    trained after the resume (reduction order differs, the function does not)."""
    return (TRAIN_STEPS - STOP_STEP) * BF16_UNIT_ROUNDOFF


def judge(name: str, result: dict, noise: float) -> dict:
    """``ok`` and ``why`` for one scenario's result (see the module docstring)."""
    first_rc = PREEMPTED_RC if name == "preempt" else (-9 if name == "kill" else 0)
    same_layout = name in ("kill", "preempt", "new_layout")
    tolerance = 4 * noise if same_layout else layout_tolerance()
    problems = []
    if result.get("first_rc") != first_rc or result.get("resume_rc") != 0:
        problems.append(f"exit codes {result.get('first_rc')}, {result.get('resume_rc')}")
    if not result["same_lines"]:
        problems.append("record lines differ from the reference")
    if result["max_rel_diff"] > tolerance:
        problems.append(f"max_rel_diff {result['max_rel_diff']:.3g} > {tolerance:.3g}")
    return {"tolerance": tolerance, "ok": not problems, "why": "; ".join(problems) or None}


def _run(cmd: list[str]) -> int:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True).returncode


def _interrupt(cmd: list[str], run_dir: Path, at_step: int, sig: int) -> int:
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists() and f'"step": {at_step}' in metrics.read_text():
            os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
            break
        time.sleep(0.05)
    return proc.wait()


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] != "event"]


def _compare(ref: list[dict], got: list[dict]) -> dict:
    same_lines = [(r["kind"], r["step"]) for r in ref] == [(r["kind"], r["step"]) for r in got]
    worst = 0.0
    for a, b in zip(ref, got):
        for key in KEYS:
            if key in a:
                worst = max(worst, abs(a[key] - b[key]) / max(abs(a[key]), 1e-30))
    return {
        "same_lines": same_lines,
        "max_rel_diff": worst,
        "bitwise_equal_losses": all(
            a.get("loss") == b.get("loss") and a.get("val_loss") == b.get("val_loss")
            for a, b in zip(ref, got)
        ),
        "release_steps": [r["step"] for r in got if r["kind"] == "release"],
    }


def _kill(run_dir: Path) -> dict:
    cmd = _cmd(run_dir, 1, "training.save_interval=2")
    first = _interrupt(cmd, run_dir, 3, signal.SIGKILL)
    return {"first_rc": first, "resume_rc": _run(cmd)}


def _preempt(run_dir: Path) -> dict:
    cmd = _cmd(run_dir, 1)
    first = _interrupt(cmd, run_dir, 2, signal.SIGUSR1)
    return {"first_rc": first, "resume_rc": _run(cmd)}


def _new_layout(run_dir: Path, both: tuple = (), resumed: tuple = ()) -> dict:
    """Stop at step 3 on one process, resume on two (``resumed``: the layout keys)."""
    first = _run(_cmd(run_dir, 1, *both, "training.exit_after_steps=3"))
    return {"first_rc": first, "resume_rc": _run(_cmd(run_dir, 2, *both, *resumed))}


SCENARIOS = {
    "kill": _kill,
    "preempt": _preempt,
    "new_layout": _new_layout,
    "tp2": lambda run_dir: _new_layout(
        run_dir, ("model.vocab_pad_multiple=64",), ("parallel.tensor_model_parallel_size=2",)
    ),
    "pp2": lambda run_dir: _new_layout(run_dir, (), ("parallel.pipeline_model_parallel_size=2",)),
    "tp2_sp": lambda run_dir: _new_layout(
        run_dir,
        ("model.vocab_pad_multiple=64",),
        ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"),
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios and print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="work directory (default: a temporary one)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=list(SCENARIOS),
        choices=list(SCENARIOS),
        help="which interrupted runs to compare (default: all)",
    )
    parser.add_argument(
        "--enforce",
        action="store_true",
        help="judge every scenario (a second reference run measures the noise); exit 1 on a "
        "failed one",
    )
    parser.add_argument("--set", action="append", default=[], help="override for every launch")
    args = parser.parse_args(argv)
    BASE.extend(args.set)
    out = Path(args.out or tempfile.mkdtemp(prefix="mqk-resume-"))
    report: dict = {"benchmark": "resume_equality"}
    ref_dir = out / "reference"
    report["reference_rc"] = _run(_cmd(ref_dir, 1))
    ref = _records(ref_dir) if report["reference_rc"] == 0 else []
    report["reference_release_steps"] = [r["step"] for r in ref if r["kind"] == "release"]
    noise = 0.0
    if args.enforce and ref:
        again = out / "reference_again"
        report["noise_rc"] = _run(_cmd(again, 1))
        noise = _compare(ref, _records(again))["max_rel_diff"] if report["noise_rc"] == 0 else 0.0
        report["noise_rel_diff"] = noise
    failed = [] if ref else ["reference"]
    for name in args.scenarios if ref else ():
        report[name] = SCENARIOS[name](out / name)
        metrics = out / name / "metrics.jsonl"
        got = _records(out / name) if metrics.exists() else []
        report[name].update(_compare(ref, got))
        if args.enforce:
            report[name].update(judge(name, report[name], noise))
            if not report[name]["ok"]:
                failed.append(name)
    if args.enforce:
        report["ok"] = not failed
        report["failed"] = failed
    print(json.dumps(report, indent=2))
    return 1 if failed and args.enforce else 0


if __name__ == "__main__":
    sys.exit(main())
