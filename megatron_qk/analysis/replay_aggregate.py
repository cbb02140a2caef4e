"""Table 8 over several runs: each rule variant's release checkpoint aggregated across seeds.

The paper's Table 8 replays the rule variants on "logged evaluation checkpoints from the main
GPT-style intervention experiments" (three seeds) and reports one release checkpoint per variant.
``megatron-qk replay-release A B C --variants`` replays each run (:func:`replay.replay_run`) and
reports, per variant, the mean release fraction over the runs, its sample standard deviation and
every run's own release, so a variant that releases differently per seed is visible.
"""

from __future__ import annotations

import statistics


def aggregate_variants(results: list[dict]) -> list[dict]:
    """One row per variant label: settings, per-run releases, mean and sample sd of the fraction.

    Args:
        results: :func:`megatron_qk.analysis.replay_log.replay_run` results with ``variants``.
    """
    rows: dict[str, dict] = {}
    for result in results:
        for variant in result["variants"]:
            row = rows.setdefault(
                variant["label"],
                {"label": variant["label"], "settings": variant["settings"], "per_run": []},
            )
            event = variant["replayed"]
            row["per_run"].append(
                {
                    "metrics": result["metrics"],
                    "step": None if event is None else event["step"],
                    "frac": None if event is None else event["frac"],
                    "reason": None if event is None else event["reason"],
                    "invalid": variant["invalid"],
                }
            )
    out = []
    for row in rows.values():
        fracs = [r["frac"] for r in row["per_run"] if r["frac"] is not None]
        row["runs_released"] = len(fracs)
        row["mean_frac"] = statistics.fmean(fracs) if fracs else None
        row["sd_frac"] = statistics.stdev(fracs) if len(fracs) > 1 else None
        out.append(row)
    return out
