"""The plain-language opening of the quickstart's ``report.md``: the paper's signatures, each
set against a yardstick and marked *appeared*, *within noise* or *absent*.

1. a real maturity release: the intervention's first maturity score is below the threshold and
   the release happens because it crossed (reason ``maturity``), not because the window ended.
   Yardstick: the rule's own patience (the score must hold for ``patience`` evaluations).
2. premature specialisation in the control: upper-half attention sharpens (the sharp-entropy
   crossing) before the lower-copy score matures (``patience`` evaluations in a row at the
   threshold). Yardstick: ``patience`` evaluations between the two events.
3. at ~3% of training the control's upper attention is sharper (lower entropy, larger logits)
   than the intervention's. Yardstick: the seed-to-seed sd of those readouts at 3% measured in
   docs/MINI_STUDY.md section 3 (the only seed spread of them measured on this corpus).
4. zeroing upper Q/K before the release costs the control more perplexity, judged over every
   checkpoint of that early window. Yardstick: the standard errors over held-out sequences that
   ``diagnose`` records, combined over the window's checkpoints (Stouffer's z).
5. the intervention ends with the lower validation loss. Yardstick: the paired standard error
   over the sequences of the whole validation split (:mod:`megatron_qk.quickstart_eval`).

A difference larger than :data:`Z_NOISE` yardsticks in the paper's direction *appeared*, one as
large the other way is *absent*, anything between is *within noise*.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from megatron_qk.analysis.plot import load_run_curves

#: A difference "appeared" when it exceeds this many standard errors (about 95% two-sided).
Z_NOISE = 2.0
#: Seed-to-seed sample sd at 3% of training over three seeds (docs/MINI_STUDY.md section 3,
#: 12-layer mini setting, same corpus): (control, intervention) upper entropy and upper logit RMS.
SEED_SD_AT_3PCT = {"upper_entropy": (0.0024, 0.0000), "upper_logit": (0.0510, 0.0073)}
#: Seed-to-seed sd of the final loss difference over three seeds (docs/MINI_STUDY.md section 4).
SEED_SD_FINAL_LOSS_DIFF = 0.0475
APPEARED, NOISE, ABSENT, UNMEASURED = "appeared", "within noise", "absent", "not measurable"


@dataclass
class Signature:
    """One paper signature as read in this run."""

    name: str
    verdict: str
    numbers: str
    yardstick: str

    def line(self) -> str:
        """The report's bullet."""
        return f"- **{self.verdict}**: {self.name}: {self.numbers}. *Yardstick:* {self.yardstick}."


def judge(difference: float, yardstick: float) -> str:
    """``appeared`` / ``absent`` / ``within noise`` for a difference signed so that positive is
    the paper's direction, against ``yardstick`` (one standard error or sd)."""
    if not math.isfinite(difference) or not math.isfinite(yardstick):
        return UNMEASURED
    if difference > Z_NOISE * yardstick:
        return APPEARED
    if difference < -Z_NOISE * yardstick:
        return ABSENT
    return NOISE


def _ratio(rec: dict) -> float:
    base = rec.get("lower_copy_uniform")
    if not base or rec.get("lower_copy") is None:
        return math.nan
    return rec["lower_copy"] / base


def _sustained(records: list[dict], test, patience: int) -> int | None:
    """Index of the first of ``patience`` consecutive records passing ``test``."""
    run = 0
    for i, rec in enumerate(records):
        run = run + 1 if test(rec) else 0
        if run >= patience:
            return i - patience + 1
    return None


def _release(summaries, rule) -> dict | None:
    return summaries["intervention"]["release"].get(rule.name)


def _maturity_release(interv, summaries, rule, score, threshold, score_name) -> Signature:
    name = "a real maturity release"
    yardstick = (
        f"the rule's patience: the score has to stay >= {threshold} for {rule.patience} "
        "evaluations in a row, inside the window, and start below it"
    )
    release = _release(summaries, rule)
    if not interv.diag or release is None:
        return Signature(name, UNMEASURED, "no diag lines or no release logged", yardstick)
    s0 = score(interv.diag[0])
    real = s0 < threshold and release["reason"] == "maturity"
    numbers = (
        f"{score_name} {s0:.3f} at step {interv.diag[0]['step']} vs threshold {threshold}; "
        f"released at step {release['step']} ({100 * release['frac']:.1f}%), reason "
        f"`{release['reason']}`"
    )
    return Signature(name, APPEARED if real else ABSENT, numbers, yardstick)


def _premature_sharpening(control, summaries, rule, score, threshold, score_name) -> Signature:
    name = "control: upper attention sharpens before the lower copy score matures"
    sharp = summaries["control"].get("sharp_entropy_crossing")
    p = rule.patience
    yardstick = f"{p} evaluations (the rule's patience) between the two events"
    mature_at = _sustained(control.diag, lambda r: score(r) >= threshold, p)
    mature = None if mature_at is None else control.diag[mature_at]
    when = (
        f"not for {p} evaluations in a row"
        if mature is None
        else f"from step {mature['step']} ({p} evaluations in a row)"
    )
    if sharp is None:
        numbers = f"upper entropy never fell below {control.sharp_threshold}; {score_name} >= "
        return Signature(name, ABSENT, f"{numbers}{threshold} {when}", yardstick)
    numbers = (
        f"upper entropy < {control.sharp_threshold} at step {sharp['step']}; {score_name} >= "
        f"{threshold} {when}"
    )
    if mature is None:
        return Signature(name, APPEARED, numbers, yardstick)
    sharp_at = next(i for i, r in enumerate(control.diag) if r["step"] >= sharp["step"])
    gap = mature_at - sharp_at  # in evaluations; positive: sharpened first
    verdict = APPEARED if gap >= p else ABSENT if gap <= -p else NOISE
    return Signature(name, verdict, f"{numbers}: sharpened {gap:+d} evaluations earlier", yardstick)


def _sharper_at_3pct(control, interv) -> Signature:
    name = "control's upper attention sharper at ~3%"
    sd = {k: math.hypot(*v) for k, v in SEED_SD_AT_3PCT.items()}
    yardstick = (
        f"the seed-to-seed sd at 3% of the arms' difference, {sd['upper_entropy']:.4f} "
        f"(entropy) and {sd['upper_logit']:.4f} (logit RMS), from three seeds of the 12-layer "
        "mini setting (docs/MINI_STUDY.md section 3)"
    )
    if not control.diag or not interv.diag:
        return Signature(name, UNMEASURED, "no diag lines", yardstick)
    c = min(control.diag, key=lambda r: abs(r["frac"] - 0.03))
    i = min(interv.diag, key=lambda r: abs(r["frac"] - 0.03))
    d_entropy = i["upper_entropy"] - c["upper_entropy"]
    d_logit = c["upper_logit"] - i["upper_logit"]
    verdicts = {judge(d_entropy, sd["upper_entropy"]), judge(d_logit, sd["upper_logit"])}
    verdict = APPEARED if verdicts == {APPEARED} else ABSENT if ABSENT in verdicts else NOISE
    numbers = (
        f"step {c['step']}: upper entropy {c['upper_entropy']:.4f} vs {i['upper_entropy']:.4f} "
        f"(difference {d_entropy:+.4f}), upper logit RMS {c['upper_logit']:.3f} vs "
        f"{i['upper_logit']:.3f} ({d_logit:+.3f}), control vs intervention"
    )
    return Signature(name, verdict, numbers, yardstick)


def _ablations(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "diagnose.json"
    if not path.exists():
        return {}
    results = json.loads(path.read_text(encoding="utf-8")).get("results", [])
    return {r["step"]: r for r in results}


def early_window_end(summaries: dict, rule, planned_steps: int) -> int:
    """Last step of the early window: the intervention's release (else its window's end)."""
    release = _release(summaries, rule)
    return release["step"] if release else round(rule.max_frac * planned_steps)


def _early_ablation(run_dirs, summaries, rule, planned_steps: int) -> Signature:
    name = "zeroing upper Q/K before the release costs the control more"
    end = early_window_end(summaries, rule, planned_steps)
    control, interv = _ablations(run_dirs["control"]), _ablations(run_dirs["intervention"])
    steps = sorted(s for s in control.keys() & interv.keys() if 0 < s <= end)
    yardstick = (
        f"{Z_NOISE:g} standard errors over the ablation's held-out sequences, combined over "
        "the window's checkpoints (Stouffer's z of control minus intervention)"
    )
    if not steps:
        return Signature(name, UNMEASURED, f"no checkpoint of both arms by step {end}", yardstick)
    zs, cells = [], []
    for step in steps:
        c, i = control[step]["ablation"], interv[step]["ablation"]
        dc, di = c["qk"]["ppl_increase"], i["qk"]["ppl_increase"]
        sc, si = (a["qk"].get("ppl_increase_se", math.nan) for a in (c, i))
        se = math.hypot(sc, si)
        zs.append((dc - di) / se if se > 0 else math.nan)
        cells.append(
            f"step {step}: {dc:+.3f} ± {sc:.3f} vs {di:+.3f} ± {si:.3f} ppl "
            f"({c.get('sequences', '?')} sequences)"
        )
    z = sum(zs) / math.sqrt(len(zs))
    numbers = (
        f"{len(steps)} checkpoint(s) up to step {end}, control vs intervention: "
        + "; ".join(cells)
        + f"; combined z = {z:+.2f}"
    )
    return Signature(name, judge(z, 1.0), numbers, yardstick)


def _final_loss(final: dict | None) -> Signature:
    name = "lower final validation loss under the intervention"
    if not final or "intervention" not in final.get("differences", {}):
        yardstick = "none: the whole-split evaluation is missing"
        return Signature(name, UNMEASURED, "no final evaluation", yardstick)
    c, i = final["arms"]["control"], final["arms"]["intervention"]
    diff = final["differences"]["intervention"]
    yardstick = (
        f"{Z_NOISE:g} paired standard errors over the {final['sequences']} sequences "
        f"({final['tokens']:,} tokens) of the whole validation split; the seed-to-seed sd of "
        f"this difference is larger ({SEED_SD_FINAL_LOSS_DIFF} nats over three seeds of the "
        "12-layer mini setting, docs/MINI_STUDY.md section 4), and one seed cannot show it"
    )
    numbers = (
        f"{i['loss']:.4f} ± {i['loss_se']:.4f} vs {c['loss']:.4f} ± {c['loss_se']:.4f} nats at "
        f"step {i['step']} (intervention vs control), difference {diff['loss']:+.4f} ± "
        f"{diff['se']:.4f}"
    )
    verdict = judge(-diff["loss"], diff["se"])
    if verdict != NOISE and abs(diff["loss"]) <= Z_NOISE * SEED_SD_FINAL_LOSS_DIFF:
        # Beyond this evaluation's noise is not beyond a second seed's: say so next to the verdict.
        numbers += (
            f"; beyond this run's sampling noise but inside {Z_NOISE:g} seed-to-seed sds "
            f"({Z_NOISE * SEED_SD_FINAL_LOSS_DIFF:.3f} nats), so another seed could reverse it"
        )
    return Signature(name, verdict, numbers, yardstick)


def signatures(
    run_dirs: dict[str, Path], summaries: dict[str, dict], rule, final: dict | None
) -> list[Signature]:
    """The five signatures of the module docstring, read off the runs.

    Args:
        run_dirs: ``{"control": dir, "intervention": dir}``.
        summaries: their ``summary.json`` contents.
        rule: the intervention's :class:`~megatron_qk.config.optim.MultiplierRuleConfig`.
        final: :func:`megatron_qk.quickstart_eval.evaluate_final`'s result (None: not run).
    """
    control = load_run_curves(run_dirs["control"])
    interv = load_run_curves(run_dirs["intervention"])
    relative = rule.threshold_mode == "over_uniform"
    threshold = rule.threshold_ratio if relative else rule.threshold
    score_name = "lower_copy / lower_copy_uniform" if relative else "lower_copy"

    def score(rec: dict) -> float:
        return _ratio(rec) if relative else rec.get("lower_copy", math.nan)

    planned = summaries["intervention"].get("planned_steps", 0)
    return [
        _maturity_release(interv, summaries, rule, score, threshold, score_name),
        _premature_sharpening(control, summaries, rule, score, threshold, score_name),
        _sharper_at_3pct(control, interv),
        _early_ablation(run_dirs, summaries, rule, planned),
        _final_loss(final),
    ]


def signature_lines(
    run_dirs: dict[str, Path], summaries: dict[str, dict], rule, final: dict | None = None
) -> list[str]:
    """Markdown lines: the count per verdict and one bullet per signature (see
    :func:`signatures` for the arguments)."""
    found = signatures(run_dirs, summaries, rule, final)
    counts = {v: sum(1 for s in found if s.verdict == v) for v in (APPEARED, NOISE, ABSENT)}
    counts[UNMEASURED] = len(found) - sum(counts.values())
    tally = ", ".join(f"{n} {v}" for v, n in counts.items() if n or v != UNMEASURED)
    lines = [
        "## Summary: the paper's signatures in this run, each against a yardstick",
        "",
        f"Of {len(found)} signatures: {tally}. A difference counts as *appeared* only when it "
        f"exceeds {Z_NOISE:g} yardsticks in the paper's direction, *absent* when it does so the "
        "other way; in between it is *within noise*.",
        "",
    ]
    return lines + [s.line() for s in found]
