"""The quickstart: the paper's experiment end to end, offline, on a 2-core CPU.

``megatron-qk quickstart`` (:mod:`megatron_qk.cli.quickstart`) runs :func:`run_quickstart`.

Stages (each one is skipped when its output exists, so a rerun resumes where it stopped):

1. **corpus**: Python's own documentation as English text
   (:mod:`megatron_qk.data.python_docs`), or ``--data fineweb-edu``: a FineWeb-Edu sample-10BT
   slice streamed from the Hugging Face hub (needs network).
2. **preprocess**: the real tokenizer pipeline writes Megatron indexed datasets (train + valid).
3. **train**: the ``quickstart`` preset's control arm and the paper's intervention arm
   (upper-half W_Q/W_K at lr x0.25, lower-copy maturity release relative to the
   uniform-attention baseline), each with 2 processes
   (torchrun, DP=2); interrupted runs resume from their last checkpoint.
4. **diagnose**: probes, upper Q/K ablation (:data:`ABLATION_SEQUENCES` validation sequences)
   and locality on every checkpoint of both runs.
5. **evaluate**: both arms' last checkpoints on the whole validation split, with standard
   errors over sequences (:mod:`megatron_qk.quickstart_eval`), ``DIR/final_eval.json``.
6. **report**: ``DIR/report.md`` with each paper signature against its yardstick, the paired
   comparison, the release point, the replayed release, the 3% mechanism readouts and the
   Figure-3 panels (``DIR/figures/*.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from megatron_qk.analysis.diagnose import DEFAULT_OUT_NAME, diagnose_checkpoints
from megatron_qk.data.pipeline import PreprocessConfig, preprocess
from megatron_qk.data.python_docs import write_python_docs_corpus
from megatron_qk.data.readers import HubDataset
from megatron_qk.diagnostics.ablation import TARGET_SE
from megatron_qk.quickstart_eval import FINAL_EVAL_FILE, evaluate_final
from megatron_qk.quickstart_report import write_report
from megatron_qk.rundir.layout import list_checkpoints
from megatron_qk.training.distributed import teardown_distributed

# The recipe (a preset, megatron_qk/config/presets/) of each arm.
ARM_PRESETS = {"control": "quickstart", "intervention": "quickstart-intervention"}
ARMS = tuple(ARM_PRESETS)
STAGES = (
    "corpus",
    "preprocess",
    "train control",
    "train intervention",
    "diagnose",
    "evaluate",
    "report",
)
# The ablation's sample: 64 validation sequences (8,192 tokens) per checkpoint, at least and at
# most (each row records whether its standard errors met diagnose's TARGET_SE; the report shows
# it). Only the both-zeroed ablation runs: zeroing upper Q, K or both makes
# every upper logit 0, so the three are one measurement. Measured CPU time (user + sys, one
# thread) of diagnosing two quickstart checkpoints (steps 40 and 80) in one process: 10.9 s with
# 8 sequences x 3 ablations (the old setting), 19.7 s with 64 x 1, 34.9 s with 64 x 3, 55.9 s
# with the whole split (215 sequences) x 1. Over the 20 checkpoints of both arms 64 x 1 adds
# ~90 s, the whole split ~450 s: too much for the README's 10-minute job.
ABLATION_SEQUENCES = 64


def _corpus(out: Path, args: argparse.Namespace) -> tuple[list[str], dict]:
    """Stage 1: the input files of the preprocessing stage and a description."""
    if args.data == "fineweb-edu":
        return [], {"source": "HuggingFaceFW/fineweb-edu sample-10BT", "documents": None}
    path = out / "corpus" / "python-docs.jsonl"
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        meta = write_python_docs_corpus(path)
        meta["source"] = f"Python {sys.version.split()[0]} documentation (pydoc topics, stdlib)"
        meta_path.write_text(json.dumps(meta) + "\n", encoding="utf-8")
    return [str(path)], json.loads(meta_path.read_text(encoding="utf-8"))


def _preprocess(out: Path, inputs: list[str], args: argparse.Namespace) -> tuple[str, dict]:
    """Stage 2: indexed datasets through the real pipeline (resumable; a no-op when done)."""
    name = "python-docs" if args.data == "python-docs" else "fineweb-edu"
    prefix = out / "data" / name
    options = dict(output_prefix=str(prefix), valid_fraction=0.05, workers=2, progress=True)
    if args.data == "fineweb-edu":
        hub = HubDataset("HuggingFaceFW/fineweb-edu", config="sample-10BT")
        options.update(hf=hub, max_docs=args.fineweb_docs)
    else:
        options["inputs"] = inputs
    summary = preprocess(PreprocessConfig(**options))
    return str(prefix), summary


def _train(out: Path, prefix: str, arm: str, args: argparse.Namespace) -> Path:
    """Stage 3: one arm with ``args.nproc`` processes; resumes or skips a finished run."""
    # The data source is part of the name, so --data fineweb-edu never reuses python-docs runs.
    run_dir = out / "runs" / args.data / f"{arm}-s{args.seed}"
    summary = run_dir / "summary.json"
    if summary.exists():
        planned = json.loads(summary.read_text(encoding="utf-8"))["planned_steps"]
        if args.steps is not None and planned != args.steps:
            raise SystemExit(
                f"megatron-qk quickstart: {run_dir} finished with {planned} steps, not --steps "
                f"{args.steps}; use another --out"
            )
        return run_dir
    overrides = [
        f"training.output_dir={run_dir}",
        f"training.seed={args.seed}",
        f"data.train_prefixes=[{prefix}_text_document]",
        f"data.valid_prefixes=[{prefix}_valid_text_document]",
    ]
    if args.steps is not None:
        overrides.append(f"training.train_steps={args.steps}")
    cmd = [sys.executable, "-m", "megatron_qk.cli", "train", ARM_PRESETS[arm]]
    cmd += ["--nproc-per-node", str(args.nproc), "--set", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not (run_dir / "summary.json").exists():
        raise RuntimeError(
            f"training the {arm} arm failed (exit {proc.returncode}); its log is above and its "
            f"run directory is {run_dir}; rerun the quickstart to resume it"
        )
    return run_dir


def _diagnose(run_dir: Path) -> None:
    """Stage 4: every checkpoint of a run not yet in its diagnose.json."""
    diagnose_checkpoints(
        list_checkpoints(run_dir / "checkpoints"),
        run_dir,
        run_dir / DEFAULT_OUT_NAME,
        num_sequences=8,
        batch_size=8,
        chunk_size=128,
        skip_done=True,
        echo=None,
        ablation_sequences=ABLATION_SEQUENCES,
        ablation_min_sequences=ABLATION_SEQUENCES,
        ablation_target_se=TARGET_SE,
        ablations=("qk",),
    )


def run_quickstart(args: argparse.Namespace) -> Path:
    """Run every stage (skipping those already done) and return the report's path.

    Args:
        args: the options of ``megatron-qk quickstart`` (``megatron_qk.cli.quickstart``).
    """
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(STAGES), desc="quickstart", unit="stage", position=0)

    def stage(name: str) -> None:
        bar.set_postfix_str(name)
        bar.write(f"[quickstart] {name}")

    stage("corpus")
    inputs, corpus = _corpus(out, args)
    bar.update()
    stage("preprocess")
    prefix, data_summary = _preprocess(out, inputs, args)
    bar.update()
    run_dirs = {}
    for arm in ARMS:
        stage(f"train {arm}")
        run_dirs[arm] = _train(out, prefix, arm, args)
        bar.update()
    stage("diagnose")
    try:
        for arm in ARMS:
            _diagnose(run_dirs[arm])
        bar.update()
        stage("evaluate")
        final = evaluate_final(run_dirs, out / FINAL_EVAL_FILE)
    finally:
        teardown_distributed()
    bar.update()
    stage("report")
    report = write_report(out, run_dirs, corpus, data_summary, final, ABLATION_SEQUENCES)
    bar.update()
    bar.close()
    return report
