"""Markdown rendering of a :func:`megatron_qk.analysis.compare.compare_runs` result (Table 1)."""

from __future__ import annotations


def format_tokens(value: float, sd: float | None = None, show_sd: bool = True) -> str:
    """Token count like the paper (``2.500B``, ``329.4M``; below a million ``4,096``), with
    ``± sd`` in the mean's unit when ``show_sd``."""
    a = abs(value)
    scale, suffix, digits = (1e9, "B", 3) if a >= 1e9 else (1e6, "M", 1) if a >= 1e6 else (1, "", 0)
    text = f"{value / scale:,.{digits}f}"
    if not show_sd:
        return text + suffix
    if sd is None:
        return f"{text}{suffix} ± n/a"
    return f"{text} ± {sd / scale:,.{digits}f}{suffix}"


def format_stat(stat: dict | None, digits: int = 4) -> str:
    """``mean ± sd`` ("n/a" for the sd of a single value)."""
    if stat is None:
        return "-"
    sd = "n/a" if stat["sd"] is None else f"{stat['sd']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {sd}"


def _token_cell(stat: dict | None, reached: int | None, n: int, constant: bool) -> str:
    if stat is None:
        return f"not reached ({n - (reached or 0)}/{n} seeds)"
    return format_tokens(stat["mean"], stat["sd"], show_sd=not constant)


def _saving_cell(tokens: float, percent: float, percent_sd: float | None | bool = False) -> str:
    """``329.4M / 13.17 ± 1.41%`` (``percent_sd=False``: no sd part)."""
    text = f"{format_tokens(tokens, show_sd=False)} / {percent:.2f}"
    if percent_sd is not False:
        text += " ± " + ("n/a" if percent_sd is None else f"{percent_sd:.2f}")
    return text + "%"


def format_table(result: dict) -> str:
    """Markdown tables: Table-1 view (per arm and paired differences) and the per-seed pairs."""
    control_arm = result["control_arm"]
    n = len(result["seeds"])
    lines = [
        f"Paired comparison over {n} seed(s) {result['seeds']}; mean ± sample sd over seeds. "
        f"Token target: {result['target']}.",
        "",
        "| Arm | Loss | PPL | Tokens to control final loss | Token saving |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm, entry in result["arms"].items():
        tokens = entry["tokens_to_target"]
        if arm == control_arm:
            constant = tokens["sd"] is None or tokens["sd"] == 0.0
            cell = _token_cell(tokens, n, n, constant)
            saving = "-"
        else:
            cell = _token_cell(tokens, entry["reached"], n, False)
            ts = entry["token_saving"]
            saving = "-"
            if ts is not None:
                pct = ts["percent"]
                saving = _saving_cell(ts["tokens"]["mean"], pct["mean"], pct["sd"])
        loss, ppl = format_stat(entry["final_val_loss"]), format_stat(entry["final_val_ppl"])
        lines.append(f"| {arm} | {loss} | {ppl} | {cell} | {saving} |")
    for arm, diff in result["differences"].items():
        tokens = diff["tokens_to_target"]
        cell = "-" if tokens is None else format_tokens(tokens["mean"], tokens["sd"])
        lines.append(
            f"| Difference ({arm} − {control_arm}) | {format_stat(diff['final_val_loss'])} | "
            f"{format_stat(diff['final_val_ppl'])} | {cell} | - |"
        )
    if result["pairs"]:
        lines += [
            "",
            "| Seed | Arm | Target loss | Δ loss | Δ PPL | Tokens to target | Saving |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for p in result["pairs"]:
            if p["tokens_to_target"] is None:
                tokens, saving = "not reached", "-"
            else:
                tokens = format_tokens(p["tokens_to_target"], show_sd=False)
                saving = _saving_cell(p["saving_tokens"], p["saving_percent"])
            lines.append(
                f"| {p['seed']} | {p['arm']} | {p['target_val_loss']:.4f} | "
                f"{p['final_val_loss_diff']:+.4f} | {p['final_val_ppl_diff']:+.4f} | "
                f"{tokens} | {saving} |"
            )
    return "\n".join(lines)
