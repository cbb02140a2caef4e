"""tools/mini_study_tables.py: paired tables over seeds from run directories."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "mini_study_tables.py"


def _tool():
    spec = importlib.util.spec_from_file_location("mini_study_tables", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(run_dir: Path, losses: dict[int, float], qk_loss: float, release=None) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for step, loss in losses.items():
        common = {"step": step, "frac": step / 100, "tokens": step}
        lines.append({"kind": "eval", "val_loss": loss, **common})
        diag = {"lower_copy": 0.01, "lower_copy_uniform": 0.02, "upper_entropy": 0.6}
        lines.append({"kind": "diag", **diag, **common})
    if release:
        lines.append({"kind": "release", "rule": "upper_qk", **release})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    probes = {
        "upper_entropy": 0.5,
        "upper_logit": 2.0,
        "logit_ratio": 1.5,
        "lower_copy": 0.03,
        "lower_copy_uniform": 0.02,
    }
    ablation = {"base_loss": 6.0, "base_ppl": 400.0, "qk": {"loss": qk_loss, "ppl": 401.0}}
    result = {"step": 4, "frac": 0.04, "probes": probes, "ablation": ablation}
    (run_dir / "diagnose.json").write_text(json.dumps({"results": [result]}))


def test_paired_differences_and_spreads_over_seeds(tmp_path, capsys):
    release = {"reason": "forced", "step": 12, "frac": 0.12, "score": 0.4, "threshold": 1.3}
    # Seed 1: intervention 0.1 lower at step 4; seed 2: 0.3 lower. Mean -0.2, sd sqrt(0.02).
    for seed, gap in (("s1", 0.1), ("s2", 0.3)):
        _write_run(tmp_path / f"control-{seed}", {0: 10.0, 4: 7.0}, qk_loss=6.5)
        _write_run(tmp_path / f"intervention-{seed}", {0: 10.0, 4: 7.0 - gap}, 6.1, release=release)
    assert _tool().main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Seeds: s1, s2; planned steps 100; compared through step 4." in out
    assert "| 4 (0.04) | 7.0000 ± 0.0000 | 6.8000 ± 0.1414 | -0.2000 ± 0.1414 |" in out
    assert "| s1 | 12 (0.120) | forced | 0.400 | 1.3 |" in out
    assert "| 4 (0.04) | copy_ratio | 1.5000 ± 0.0000 | 1.5000 ± 0.0000 |" in out
    assert "| 4 (0.04) | 0.5000 ± 0.0000 | 0.1000 ± 0.0000 | 1.0000 ± 0.0000 |" in out
    assert _tool().main([str(tmp_path / "nothing")]) == 2


def test_uniform_copy_baseline_per_window_length():
    spec = importlib.util.spec_from_file_location(
        "uniform_copy_baseline", TOOL.parent / "uniform_copy_baseline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import numpy as np
    import pytest

    tokens = np.array([5, 7, 5, 5, 9, 7, 1], dtype=np.uint16)
    out = module.baselines(tokens, [3, 6], threshold=0.005)
    # Windows of 3: [5 7 5] -> i=2 (1/3); [5 9 7] -> none. Window of 6: i=2, 3, 5.
    assert (out[3]["sequences"], out[3]["positions"]) == (2, 1)
    assert out[3]["uniform"] == pytest.approx(1 / 3)
    assert out[6]["uniform"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 6) / 3)
    assert out[6]["threshold_over_uniform"] == pytest.approx(0.005 / out[6]["uniform"])
    with pytest.raises(ValueError, match="fewer than one window"):
        module.baselines(tokens, [8], threshold=0.005)
