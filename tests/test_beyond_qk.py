"""The "beyond the paper" table (``examples/configs/beyond_qk``) end to end at toy scale.

Six arms (control, the paper's intervention, QK-norm, QK-norm + intervention, QK-clip, QK-clip +
intervention) train in smoke mode (the model of :data:`SMOKE_OVERRIDES`, every other setting of
the recipes kept), then the table's documented analysis (compare, readout at 3% and 20%) must
give every arm against the control. The recipes' own switches must reach the trained runs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import yaml

from megatron_qk.analysis.table_plan import resolve_tables
from megatron_qk.analysis.table_runner import run_cli_command, run_table
from megatron_qk.cli import main

ARMS = [
    "control",
    "intervention",
    "qk_clip",
    "qk_clip_intervention",
    "qk_norm",
    "qk_norm_intervention",
]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("beyond") / "runs"
    (table_dir,) = resolve_tables(["beyond_qk"])
    run_table(table_dir, root, functools.partial(run_cli_command, main), seeds="1", smoke=True)
    return root / "beyond_qk"


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_arm_against_the_control(table):
    assert sorted(_json(table / "compare.json")["arms"]) == ARMS
    readout = _json(table / "readout.json")
    for at in (0.03, 0.2):
        pairs = {p["arm"]: p for p in readout["pairs"] if p["at"] == at}
        assert sorted(pairs) == ARMS, at
        for arm, row in pairs.items():
            assert row["final_ppl"] is not None and row["ppl_reduction"] is not None, (arm, at)
            assert row["upper_entropy"] is not None and row["upper_logit"] is not None, (arm, at)


def test_the_recipes_switches_reach_the_runs(table):
    for arm in ARMS:
        cfg = yaml.safe_load((table / f"{arm}-s1" / "config.yaml").read_text())
        assert cfg["model"]["qk_layernorm"] == arm.startswith("qk_norm"), arm
        assert cfg["optim"]["qk_clip"]["enabled"] == arm.startswith("qk_clip"), arm
        assert bool(cfg["optim"]["rules"]) == arm.endswith("intervention"), arm
        lines = (table / f"{arm}-s1" / "metrics.jsonl").read_text().splitlines()
        train = [json.loads(x) for x in lines if '"kind": "train"' in x]
        assert train, arm
        # QK-clip arms log the step's max attention logit; the others do not collect it.
        logged = ["max_attention_logit" in r for r in train]
        assert all(logged) if arm.startswith("qk_clip") else not any(logged), arm


def test_the_study_tables_tool_reads_the_table(table, capsys):
    """tools/beyond_qk_tables.py (docs/BEYOND_QK.md's tables) on the smoke table: every arm,
    paired with the control, and the max logit of exactly the runs that logged it."""
    import importlib.util

    tool = Path(__file__).resolve().parents[1] / "tools" / "beyond_qk_tables.py"
    spec = importlib.util.spec_from_file_location("beyond_qk_tables", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(table), "--at", "0.2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for arm in ARMS:
        assert f"| {arm} | 1 |" in out, arm
    assert rows["qk_norm"].split("|")[4].strip().endswith("(1)")  # paired with control seed 1
    second = out.split("| arm | seed |")[1]
    logit_rows = [line for line in second.splitlines() if line.startswith("| ")]
    assert len(logit_rows) == 2  # the clip arms alone log the max logit
    for arm in ("qk_clip", "qk_clip_intervention"):
        lines = (table / f"{arm}-s1" / "metrics.jsonl").read_text().splitlines()
        values = [json.loads(x)["max_attention_logit"] for x in lines if '"kind": "train"' in x]
        row = next(r for r in logit_rows if r.startswith(f"| {arm} | 1 | "))
        assert f"| {max(values):.2f} |" in row
        assert f"| {sum(v > 100.0 for v in values)} of {len(values)} |" in row


@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_is_table1_but_for_its_own_switch(arm):
    """The 270M arms are Table 1's recipes with only QK-norm / QK-clip added (and labels)."""
    from megatron_qk.config.loader import config_to_dict, load_config
    from megatron_qk.rundir.config_hash import flatten_config

    configs = Path(__file__).resolve().parents[1] / "examples" / "configs"
    base = "intervention" if arm.endswith("intervention") else "control"
    theirs = flatten_config(config_to_dict(load_config(str(configs / "table1_gpt270m" / base))))
    ours = flatten_config(config_to_dict(load_config(str(configs / "beyond_qk" / arm))))
    differ = {k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)}
    labels = {"name", "arm", "training.output_dir"}
    switch = {"model.qk_layernorm"} if arm.startswith("qk_norm") else set()
    if arm.startswith("qk_clip"):
        switch = {"optim.qk_clip.enabled"}  # threshold 100 and alpha 0.5 are the defaults
    assert differ - labels == switch, arm
