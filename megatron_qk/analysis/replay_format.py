"""Text reports of ``replay-release``: one run's replay (Table 8 style) and the aggregate of
the Table 8 variants over several runs. Torch-free."""

from __future__ import annotations


def release_text(event: dict | None, end: int, planned: int) -> str:
    if event is None:
        return f"no release through step {end} of {planned}"
    return f"step {event['step']} ({100 * event['frac']:.2f}%, {event['reason']})"


def threshold_text(settings: dict) -> str:
    if settings.get("threshold_mode") == "over_uniform":
        return f"{settings['threshold_ratio']:g} x uniform"
    return f"{settings['threshold']:g}"


def format_report(result: dict) -> str:
    """Human-readable replay report (Table 8 style)."""
    s, end, planned = result["settings"], result["replayed_through_step"], result["planned_steps"]
    if s.get("threshold_mode") == "over_uniform":
        compared = f"lower_copy / lower_copy_uniform >= {s['threshold_ratio']}"
    else:
        compared = f"threshold {s['threshold']}"
    lines = [
        f"rule {result['rule']}: {compared}, patience {s['patience']}, window "
        f"{100 * s['min_frac']:g}-{100 * s['max_frac']:g}% (settings from "
        f"{result['settings_from']}), {planned} planned steps, replayed through step {end}",
        f"replayed release: {release_text(result['replayed'], end, planned)}",
    ]
    crossing = result["first_crossing"]
    if crossing is not None:
        lines.append(
            f"first threshold crossing: step {crossing['step']} ({100 * crossing['frac']:.2f}%)"
        )
    if result["logged"] is not None:
        lines.append(f"logged release:   {release_text(result['logged'], end, planned)}")
    if result["agrees"] is not None:
        lines.append(f"agrees with the run's own release: {'yes' if result['agrees'] else 'NO'}")
    elif result["logged"] is not None:
        lines.append("(settings differ from the run's, so the releases need not agree)")
    elif result.get("log_ends_at_release"):
        lines.append(
            "(the log ends at the replayed release step, before the run's own release line "
            "could be written: no comparison possible)"
        )
    if result["variants"]:
        lines += [
            "",
            "| Rule | Threshold | Patience | Release window | Release checkpoint |",
            "|---|---:|---:|---|---:|",
        ]
        for row in result["variants"]:
            vs, ev = row["settings"], row["replayed"]
            if row["invalid"] is not None:
                point = "invalid: " + row["invalid"]
            elif ev is None:
                point = "no release"
            else:
                point = f"{100 * ev['frac']:.2f}% (step {ev['step']}, {ev['reason']})"
            lines.append(
                f"| {row['label']} | {threshold_text(vs)} | {vs['patience']} | "
                f"{100 * vs['min_frac']:g}–{100 * vs['max_frac']:g}% | {point} |"
            )
    return "\n".join(lines)


def format_aggregate(rows: list[dict], num_runs: int) -> str:
    """Table 8 as markdown: mean (± sample sd) release checkpoint over the runs."""
    lines = [
        f"Table 8 over {num_runs} runs (release checkpoint: mean ± sample sd over the runs that "
        "released; per-run values after it)",
        "",
        "| Rule | Threshold | Patience | Release window | Release checkpoint | per run |",
        "|---|---:|---:|---|---:|---|",
    ]
    for row in rows:
        s = row["settings"]
        if row["mean_frac"] is None:
            point = "no release"
        else:
            point = f"{100 * row['mean_frac']:.2f}%"
            if row["sd_frac"] is not None:
                point += f" ± {100 * row['sd_frac']:.2f}"
        per_run = ", ".join(
            "invalid"
            if r["invalid"]
            else ("none" if r["frac"] is None else f"{100 * r['frac']:.2f}%")
            for r in row["per_run"]
        )
        lines.append(
            f"| {row['label']} | {threshold_text(s)} | {s['patience']} | "
            f"{100 * s['min_frac']:g}–{100 * s['max_frac']:g}% | {point} | {per_run} |"
        )
    return "\n".join(lines)
