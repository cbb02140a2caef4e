"""Small run directories written by hand (config, metrics lines, diagnose.json, summary) for the
report and figure tests: every number in them is chosen by the test that reads it."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_qk.config.loader import dump_config, load_config

RULE_SET = "optim.rules=[{name: upper_qk, threshold_mode: over_uniform, threshold_ratio: 1.3}]"
PLANNED = 100
TOKENS_PER_STEP = 512


def write_run(
    root: Path,
    arm: str,
    diag: list[tuple],
    ablation: list[tuple] = (),
    release: dict | None = None,
    crossing: dict | None = None,
    seed: int = 1,
    name: str = "pair",
    final_ppl: float | None = None,
) -> Path:
    """A run directory.

    Args:
        diag: ``(step, lower_copy, upper_entropy, upper_logit)`` per evaluation (also an eval
            line with loss ``10 - step / 20``); the uniform copy baseline is 0.02.
        ablation: ``(step, ppl_increase, standard error)`` per checkpoint (diagnose.json).
        release: the intervention's release line fields (reason, step, frac, ...).
        crossing: the sharp-entropy event (step, frac, upper_entropy).
        final_ppl: writes a finished summary.json with this final perplexity.
    """
    run_dir = root / f"{name}-{arm}-s{seed}"
    run_dir.mkdir(parents=True)
    sets = [
        f"training.train_steps={PLANNED}",
        f"arm={arm}",
        f"name={name}",
        f"training.seed={seed}",
    ]
    if arm == "intervention":
        sets.append(RULE_SET)
    (run_dir / "config.yaml").write_text(dump_config(load_config("tiny", sets)))
    lines = []
    for step, copy, entropy, logit in diag:
        at = {"step": step, "frac": step / PLANNED, "tokens": step * TOKENS_PER_STEP}
        lines.append({"kind": "eval", **at, "val_loss": 10 - step / 20})
        lines.append(
            {
                "kind": "diag",
                **at,
                "sequences": 8,
                "lower_copy": copy,
                "lower_copy_uniform": 0.02,
                "upper_entropy": entropy,
                "upper_logit": logit,
                "upper_qk_sigma": 0.1 + step / 100,
            }
        )
    if release is not None:
        tokens = release["step"] * TOKENS_PER_STEP
        lines.append({"kind": "release", "rule": "upper_qk", "tokens": tokens, **release})
    if crossing is not None:
        lines.append({"kind": "event", "event": "sharp_entropy_crossing", **crossing})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    results = [
        {
            "step": step,
            "frac": step / PLANNED,
            "ablation": {
                "base_ppl": 300.0,
                "sequences": 64,
                "tokens": 64 * 64,
                "target_met": False,
                "qk": {"ppl_increase": inc, "ppl_increase_se": se},
            },
        }
        for step, inc, se in ablation
    ]
    (run_dir / "diagnose.json").write_text(json.dumps({"results": results}))
    if final_ppl is not None:
        summary = {"finished": True, "final_val_ppl": final_ppl, "final_val_loss": 5.0}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir
