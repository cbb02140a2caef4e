"""The example recipes and launch scripts: every recipe loads and fits its intended layout; the
scripts' dry-run mode validates and builds on CPU; the table runner trains and compares a tiny
table end to end through torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_paper_rule, subprocess_env

from megatron_qk.config.loader import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
LAUNCH = ROOT / "examples" / "launch"
RECIPES = sorted(CONFIGS.rglob("*.yaml"))


def _env(**extra: str) -> dict[str, str]:
    return subprocess_env(PYTHON=sys.executable, **extra)


def _script(name: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / name)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(**env),
        cwd=env.get("CWD", str(ROOT)),
    )


def test_every_paper_table_has_recipes():
    tables = {p.name for p in CONFIGS.iterdir() if p.is_dir()}
    for prefix in ("table1_", "table3_", "table4_", "table5_", "table6_", "table7_", "table9_",
                   "table10_", "table11_", "scaleup_"):  # fmt: skip
        assert any(t.startswith(prefix) for t in tables), prefix
    for table in tables:
        assert (CONFIGS / table / "seeds").read_text().split(), table
    assert len((CONFIGS / "table1_gpt270m" / "seeds").read_text().split()) == 3


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_recipe_loads_and_fits_its_cluster(recipe):
    cfg = load_config(recipe)
    rel = recipe.relative_to(CONFIGS)
    assert cfg.training.output_dir == f"runs/{rel.with_suffix('')}"
    # 270M / 0.7B recipes: one node of 8 GPUs; the scale-up: 4 nodes (TP2 x PP2 x DP8); the
    # mini study (docs/MINI_STUDY.md): one CPU process.
    mini = rel.parts[0] == "mini"
    world = 32 if rel.parts[0].startswith("scaleup") else 1 if mini else 8
    cfg.validate_world(world)
    rules = {r.name: r for r in cfg.optim.rules}
    if cfg.arm == "intervention":
        rule = rules["upper_qk"]
        assert_paper_rule(rule)
        # Paper recipes compare the absolute copy mass; the mini study (seq 128) its ratio to
        # the uniform baseline, calibrated to the paper's 0.005 at seq 1024.
        mode = ("over_uniform", 1.3) if mini else ("absolute", None)
        assert (rule.threshold_mode, rule.threshold_ratio) == mode
    if cfg.arm == "control":
        assert not rules and not cfg.optim.entropy_floor.enabled and cfg.optim.lr_multiplier == 1


def test_table_arms_differ_only_by_their_intervention():
    def load(rel):
        return load_config(CONFIGS / rel)

    assert load("table10_multiplier_sweep/mult_0p125.yaml").optim.rules[0].multiplier == 0.125
    fixed = load("table9_fixed_release/fixed_6pct.yaml").optim.rules[0]
    assert (fixed.release, fixed.release_frac, fixed.multiplier) == ("fixed", 0.06, 0.25)
    floor = load("table6_entropy_floor/entropy_floor.yaml").optim.entropy_floor
    assert (floor.enabled, floor.h0, floor.lam) == (True, 0.8, 0.1)
    assert load("table7_global_lr/global_lr_half.yaml").optim.lr_multiplier == 0.5
    geglu = load("table4_gated_ffn/geglu/control.yaml").model
    assert (geglu.ffn, geglu.ffn_hidden_size, geglu.normalization) == ("geglu", 2560, "layernorm")
    llama_ln = load("table3_components/llama_layernorm/control.yaml").model
    assert (llama_ln.ffn, llama_ln.normalization, llama_ln.bias) == ("swiglu", "layernorm", False)
    t5 = load("table5_ffn_write/gelu2560.yaml")
    assert t5.model.ffn_hidden_size == 2560 and t5.training.stop_at_frac == 0.2
    assert t5.training.exit_after_steps is None  # stopping is the recipe's, not per launch
    assert round(0.2 * t5.planned_steps()) == 954 and t5.planned_steps() == 4769


def test_train_sh_dry_run_builds_the_model_and_refuses_bad_input():
    recipe = CONFIGS / "table1_gpt270m" / "intervention.yaml"
    proc = _script("train.sh", CONFIG=str(recipe), GPUS="8", DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["parameters"]["total"] == report["expected_parameters"] == 269_727_360
    assert report["planned_steps"] == 4769
    # The paper's evaluation grid (Table 8's release points among its steps).
    assert {0, 143, 191, 238, 262, 4769} <= set(report["evaluation_steps"])
    # 512 sequences do not split over 3 data-parallel ranks of 16.
    bad = _script("train.sh", CONFIG=str(recipe), GPUS="3", DRY_RUN="1")
    assert bad.returncode == 2 and "training.global_batch_size" in bad.stderr
    missing = _script("train.sh", DRY_RUN="1")
    assert missing.returncode == 2 and "set CONFIG" in missing.stderr


def test_slurm_and_preprocess_dry_runs():
    recipe = CONFIGS / "scaleup_gpt2.7b" / "control.yaml"
    proc = _script("train_slurm.sh", CONFIG=str(recipe), NODES="4", GPUS_PER_NODE="8", DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"pipeline_model_parallel_size": 2' in proc.stdout
    srun = proc.stdout.strip().splitlines()[-1]
    assert srun.startswith("would run: srun --nodes 4")
    assert "--rdzv-backend static" in srun and "--nproc-per-node 8" in srun
    # 3 nodes x 8 GPUs do not hold TP2 x PP2 with the batch of 512.
    bad = _script("train_slurm.sh", CONFIG=str(recipe), NODES="3", DRY_RUN="1")
    assert bad.returncode != 0
    no_slurm = _script("train_slurm.sh", CONFIG=str(recipe))
    assert no_slurm.returncode == 2 and "sbatch" in no_slurm.stderr
    prep = _script("preprocess_fineweb_edu.sh", DRY_RUN="1", WORKERS="2")
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert "--hf-dataset HuggingFaceFW/fineweb-edu --hf-config sample-10BT" in prep.stdout
    assert "--output-prefix data/fineweb-edu-10BT" in prep.stdout


def test_run_table_trains_a_tiny_table_and_compares(tmp_path):
    table = tmp_path / "tiny_table"
    table.mkdir()
    common = (
        "base: tiny\nname: tiny-table\ntraining:\n  train_steps: 6\n  eval_interval: 3\n"
        "  save_interval: 0\nlogging:\n  progress_bar: false\n"
    )
    (table / "control.yaml").write_text(common + "arm: control\n")
    (table / "intervention.yaml").write_text(
        common + "arm: intervention\noptim:\n  rules:\n    - name: upper_qk\n      release: never\n"
    )
    (table / "seeds").write_text("7\n")
    dry = _script("run_table.sh", TABLE=str(table), DRY_RUN="1", GPUS="1")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.count("would train") == 2
    proc = _script("run_table.sh", timeout=600, TABLE=str(table), GPUS="1",
                   RUNS_DIR=str(tmp_path / "runs"))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    runs = tmp_path / "runs" / "tiny_table"
    for arm in ("control", "intervention"):
        for seed in (7,):
            summary = json.loads((runs / f"{arm}-s{seed}" / "summary.json").read_text())
            assert (summary["arm"], summary["seed"], summary["steps"]) == (arm, seed, 6)
    report = json.loads((runs / "compare.json").read_text())
    assert report  # the comparison of the two arms over the two seeds was written
    assert sorted(report["arms"]) == ["control", "intervention"]
    assert "| intervention |" in proc.stdout  # the table is printed
    # Rerun: finished runs are skipped.
    again = _script("run_table.sh", TABLE=str(table), GPUS="1", RUNS_DIR=str(tmp_path / "runs"))
    assert again.returncode == 0 and again.stdout.count("skipping") == 2


def test_run_table_reuses_identical_runs_and_skips_stopped_ones(tmp_path):
    """A run with the same resolved config in another table is linked, not retrained; a run
    stopped on purpose (training.stop_at_frac) is complete and skipped on a rerun."""
    common = (
        "base: tiny\ntraining:\n  train_steps: 4\n  eval_interval: 2\n  save_interval: 0\n"
        "logging:\n  progress_bar: false\n  tensorboard: false\n"
    )
    first, second = tmp_path / "first", tmp_path / "second"
    for table, name in ((first, "first"), (second, "second")):
        table.mkdir()
        (table / "seeds").write_text("3\n")
        (table / "control.yaml").write_text(common + f"name: {name}\narm: control\n")
    # One arm, and a stopped run with no final loss to compare: these tables are read with
    # readout (compare would fail the script: a table that cannot be produced is an error).
    for table in (first, second):
        (table / "analysis").write_text("readout {runs} --at 0.5\n")
    (second / "stopped.yaml").write_text(
        common.replace("save_interval: 0", "save_interval: 0\n  stop_at_frac: 0.5")
        + "name: second\narm: stopped\n"
    )
    runs = tmp_path / "runs"
    proc = _script("run_table.sh", timeout=600, TABLE=str(first), GPUS="1", RUNS_DIR=str(runs))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    dry = _script("run_table.sh", TABLE=str(second), DRY_RUN="1", GPUS="1", RUNS_DIR=str(runs))
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "would reuse" in dry.stdout and dry.stdout.count("would train") == 1
    proc = _script("run_table.sh", timeout=600, TABLE=str(second), GPUS="1", RUNS_DIR=str(runs))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    linked = runs / "second" / "control-s3"
    assert "reusing" in proc.stdout and "identical resolved config" in proc.stdout
    assert linked.is_symlink() and linked.resolve() == (runs / "first" / "control-s3").resolve()
    stopped = json.loads((runs / "second" / "stopped-s3" / "summary.json").read_text())
    assert stopped["stopped"] and stopped["steps"] == 2
    again = _script("run_table.sh", TABLE=str(second), GPUS="1", RUNS_DIR=str(runs))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stopped-s3 stopped, skipping" in again.stdout
    assert "control-s3 finished, skipping" in again.stdout
