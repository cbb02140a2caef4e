"""The plain-language opening of the quickstart's ``report.md``: which paper signatures appeared.

Each signature is a direction the paper reports, checked on this run's own numbers (one seed,
so a direction is not a significant effect; the study in docs/MINI_STUDY.md repeats seeds):

1. a real maturity release: the intervention's first maturity score is below the threshold and
   the release happens because it crossed (reason ``maturity``), not because the window ended;
2. premature specialisation in the control: upper-half attention sharpens (entropy below the
   sharpness threshold) before the lower-copy score matures;
3. at ~3% of training the control's upper attention is sharper (lower entropy, larger logits)
   than the intervention's;
4. zeroing upper Q/K at the earliest checkpoint (<= 10%) costs the control more perplexity;
5. the intervention ends with the lower validation loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_qk.analysis.plot import load_run_curves

EARLY_FRAC = 0.10


def _first(records: list[dict], test) -> dict | None:
    return next((r for r in records if test(r)), None)


def _ratio(rec: dict) -> float:
    base = rec.get("lower_copy_uniform")
    if not base or rec.get("lower_copy") is None:
        return math.nan
    return rec["lower_copy"] / base


def _verdict(appeared: bool | None) -> str:
    return {True: "appeared", False: "did not appear", None: "not measurable"}[appeared]


def _early_ablation(run_dir: Path) -> dict | None:
    path = run_dir / "diagnose.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text(encoding="utf-8")).get("results", [])
    early = [r for r in results if 0 < r["frac"] <= EARLY_FRAC + 1e-9]
    return min(early, key=lambda r: r["frac"]) if early else None


def signature_lines(run_dirs: dict[str, Path], summaries: dict[str, dict], rule) -> list[str]:
    """Markdown lines: a short paragraph and one bullet per signature, with the numbers.

    Args:
        run_dirs: ``{"control": dir, "intervention": dir}``.
        summaries: their ``summary.json`` contents.
        rule: the intervention's :class:`~megatron_qk.config.optim.MultiplierRuleConfig`.
    """
    control, interv = (
        load_run_curves(run_dirs["control"]),
        load_run_curves(run_dirs["intervention"]),
    )
    relative = rule.threshold_mode == "over_uniform"
    threshold = rule.threshold_ratio if relative else rule.threshold
    score_name = "lower_copy / lower_copy_uniform" if relative else "lower_copy"

    def score(rec: dict) -> float:
        return _ratio(rec) if relative else rec.get("lower_copy", math.nan)

    bullets = []
    # 1. A real maturity release.
    first = interv.diag[0] if interv.diag else None
    release = summaries["intervention"]["release"].get(rule.name)
    if first is None or release is None:
        bullets.append(("maturity release", None, "no diag lines or no release logged"))
    else:
        s0 = score(first)
        real = s0 < threshold and release["reason"] == "maturity"
        bullets.append(
            (
                "a real maturity release",
                real,
                f"{score_name} {s0:.3f} at step {first['step']} vs threshold {threshold}; "
                f"released at step {release['step']} ({100 * release['frac']:.1f}%), reason "
                f"`{release['reason']}`",
            )
        )
    # 2. Control: upper attention sharpens before the lower copy matures.
    sharp = summaries["control"].get("sharp_entropy_crossing")
    mature = _first(control.diag, lambda r: score(r) >= threshold)
    if sharp is None:
        bullets.append(
            (
                "control: upper attention sharpens before the lower copy score matures",
                False,
                f"upper entropy never fell below {control.sharp_threshold}",
            )
        )
    else:
        before = mature is None or sharp["step"] < mature["step"]
        when = "never" if mature is None else f"at step {mature['step']}"
        bullets.append(
            (
                "control: upper attention sharpens before the lower copy score matures",
                before,
                f"upper entropy < {control.sharp_threshold} at step {sharp['step']}; "
                f"{score_name} >= {threshold} {when}",
            )
        )
    # 3. Sharper upper attention in the control at ~3%.
    if control.diag and interv.diag:
        c = min(control.diag, key=lambda r: abs(r["frac"] - 0.03))
        i = min(interv.diag, key=lambda r: abs(r["frac"] - 0.03))
        sharper = c["upper_entropy"] < i["upper_entropy"] and c["upper_logit"] > i["upper_logit"]
        bullets.append(
            (
                f"control's upper attention sharper at ~3% (step {c['step']})",
                sharper,
                f"upper entropy {c['upper_entropy']:.4f} vs {i['upper_entropy']:.4f}, upper logit "
                f"RMS {c['upper_logit']:.3f} vs {i['upper_logit']:.3f} (control vs intervention)",
            )
        )
    # 4. Early upper Q/K ablation costs the control more.
    ca, ia = _early_ablation(run_dirs["control"]), _early_ablation(run_dirs["intervention"])
    if ca is None or ia is None:
        bullets.append(
            ("zeroing upper Q/K early costs the control more", None, "no checkpoint <= 10%")
        )
    else:
        cq, iq = ca["ablation"]["qk"]["ppl_increase"], ia["ablation"]["qk"]["ppl_increase"]
        bullets.append(
            (
                "zeroing upper Q/K early costs the control more",
                cq > iq,
                f"{cq:+.3f} vs {iq:+.3f} ppl at the step-{ca['step']} / step-{ia['step']} "
                "checkpoints (control vs intervention)",
            )
        )
    # 5. Loss.
    lc = summaries["control"].get("final_val_loss")
    li = summaries["intervention"].get("final_val_loss")
    if lc is None or li is None:
        bullets.append(("lower final validation loss under the intervention", None, "no loss"))
    else:
        bullets.append(
            (
                "lower final validation loss under the intervention",
                li < lc,
                f"{li:.4f} vs {lc:.4f} (difference {li - lc:+.4f})",
            )
        )
    shown = sum(1 for _, ok, _ in bullets if ok)
    lines = [
        "## Summary: which of the paper's signatures appeared in this run",
        "",
        f"{shown} of {len(bullets)} signatures appeared, each read as a direction on one seed "
        "with no error bar, so a tiny difference counts (docs/MINI_STUDY.md repeats seeds):",
        "",
    ]
    lines += [f"- **{_verdict(ok)}**: {name}: {text}." for name, ok, text in bullets]
    return lines
