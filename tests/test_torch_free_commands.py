"""``compare`` and ``replay-release`` read JSON and YAML only: no torch, no megatron import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import subprocess_env
from test_analysis_compare import CONTROL, INTERVENTION, RULE, make_run

CHECK = (
    "import sys\n"
    "from megatron_qk.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "heavy = sorted(m for m in sys.modules\n"
    "               if m == 'torch' or m.startswith(('torch.', 'megatron.')))\n"
    "assert not heavy, heavy\n"
    "sys.exit(rc)\n"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "control", 1, CONTROL[1])
    run = make_run(root, "intervention", 1, INTERVENTION[1], RULE)
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as f:
        # Scores below the threshold: the rule's forced release at 12% of 8 steps, as logged.
        release = {"kind": "release", "rule": "upper_qk", "reason": "forced", "step": 1}
        f.write(json.dumps(release | {"frac": 1 / 8, "tokens": 512}) + "\n")
        for step in (2, 4, 6, 8):
            diag = {"kind": "diag", "step": step, "frac": step / 8, "tokens": step * 512}
            f.write(json.dumps(diag | {"lower_copy": 0.001, "lower_copy_uniform": 0.01}) + "\n")
    return root


@pytest.mark.parametrize("command", ["compare", "replay-release"])
def test_command_runs_without_torch_or_megatron(runs, command):
    target = runs if command == "compare" else runs / "intervention-s1"
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, command, str(target)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
