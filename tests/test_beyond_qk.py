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
