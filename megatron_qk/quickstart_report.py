"""The quickstart's ``report.md``: signatures against yardsticks, comparison, release, readouts,
ablation, figures.

Every number in the report is read from the run directories the quickstart just wrote
(``summary.json``, ``metrics.jsonl``, ``diagnose.json``) through the same functions as the
``compare``, ``replay-release`` and ``plot`` commands, plus the whole-split final evaluation
(:mod:`megatron_qk.quickstart_eval`). Each perplexity is labelled with the sample it was
computed on: the training's evaluation sample, the ablation's sample, or the whole split.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from megatron_qk.analysis.compare_format import format_table
from megatron_qk.analysis.compare_load import load_and_compare
from megatron_qk.analysis.plot import PANELS, load_run_curves, plot_runs
from megatron_qk.analysis.replay_log import replay_run
from megatron_qk.config.loader import load_resolved_config
from megatron_qk.quickstart_summary import signature_lines

READOUTS = (
    ("lower_copy", "lower copy"),
    ("upper_entropy", "upper entropy"),
    ("upper_logit", "upper logit"),
    ("logit_ratio", "upper/lower logit"),
    ("upper_qk_sigma", "σ₁(W_Qᵀ W_K)"),
    ("upper_qk_displacement", "Q/K displacement"),
    ("upper_ffn_write_rms", "upper FFN write RMS"),
)


def _world_size(run_dir: Path) -> int:
    meta = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")).get("_meta", {})
    return int(meta.get("world_size", 1))


def _nearest(records: list[dict], frac: float) -> dict:
    return min(records, key=lambda r: abs(r["frac"] - frac))


def _readout_table(run_dirs: dict[str, Path], frac: float) -> list[str]:
    header = "| Arm | step (frac) | " + " | ".join(label for _, label in READOUTS) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(READOUTS)]
    for arm, run_dir in run_dirs.items():
        rec = _nearest(load_run_curves(run_dir).diag, frac)
        cells = " | ".join(
            "n/a" if rec.get(key) is None else f"{rec[key]:.4f}" for key, _ in READOUTS
        )
        lines.append(f"| {arm} | {rec['step']} ({rec['frac']:.3f}) | {cells} |")
    return lines


def _increase(entry: dict) -> str:
    """``+x.xxx ± se`` (the standard error over held-out sequences, when recorded)."""
    se = entry.get("ppl_increase_se")
    text = f"{entry['ppl_increase']:+.3f}"
    return text if se is None else f"{text} ± {se:.3f}"


ABLATION_NOTE = (
    "Zeroing the upper-half queries, the keys or both makes every upper pre-softmax logit 0 by "
    "construction (the layer then attends uniformly over its causal keys), so the three "
    "ablations are one measurement; the table shows it once. `ppl` is the checkpoint's "
    "perplexity on the ablation's own sample (the `sequences` column: the first sequences of "
    "the run's validation dataset), not on the whole split. ± is the paired standard error "
    "over those sequences."
)


def _ablation_lines(run_dirs: dict[str, Path]) -> list[str]:
    lines = [
        "| Arm | checkpoint step (frac) | sequences (tokens) | ppl on them "
        "| +ppl, upper Q/K zeroed | SE target met | λ_Q | λ_K | R_P/‖X‖² |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for arm, run_dir in run_dirs.items():
        path = run_dir / "diagnose.json"
        if not path.exists():
            continue
        for r in json.loads(path.read_text(encoding="utf-8"))["results"]:
            a, loc = r["ablation"], r["locality"]
            met = {True: "yes", False: "no", None: "n/a"}[a.get("target_met")]
            lines.append(
                f"| {arm} | {r['step']} ({r['frac']:.2f}) | {a.get('sequences', '?')} "
                f"({a.get('tokens', 0):,}) | {a['base_ppl']:.2f} | {_increase(a['qk'])} | {met} "
                f"| {loc['lambda_q']:.3f} | {loc['lambda_k']:.3f} | {loc['rp_fraction']:.3f} |"
            )
    return lines


def _final_lines(final: dict | None) -> list[str]:
    if not final:
        return ["The whole-split evaluation did not run."]
    lines = [
        f"Each arm's last checkpoint on all {final['sequences']} sequences "
        f"({final['tokens']:,} tokens) of the validation split; ± is the standard error over "
        "sequences (the difference's is paired: the same sequences score both arms).",
        "",
        "| Arm | step | loss (nats/token) | ppl |",
        "|---|---:|---:|---:|",
    ]
    for arm, a in final["arms"].items():
        lines.append(
            f"| {arm} | {a['step']} | {a['loss']:.4f} ± {a['loss_se']:.4f} | {a['ppl']:.2f} |"
        )
    for arm, d in final["differences"].items():
        lines.append(f"| Difference ({arm} − control) | | {d['loss']:+.4f} ± {d['se']:.4f} | |")
    return lines


def _sample_lines(cfg, final: dict | None, ablation_sequences: int | None) -> list[str]:
    t, d = cfg.training, cfg.diagnostics
    evals = t.eval_iters * t.global_batch_size
    seq = cfg.model.seq_length
    whole = "" if not final else f" ({final['sequences']} sequences, {final['tokens']:,} tokens)"
    return [
        f"- Training evaluations (`eval` lines, the comparison table, Figure F): {evals} "
        f"sequences ({evals * seq:,} tokens) every {t.eval_interval} steps.",
        f"- Mechanism probes (`diag` lines, panels A-D): {d.num_sequences} sequences.",
        f"- Ablation: {ablation_sequences or '?'} sequences per checkpoint (the `SE target "
        "met` column says whether every standard error fell below the target of `megatron-qk "
        "diagnose`, +0.035 ppl). More would cost more than the quickstart's 10 minutes allow: "
        "diagnosing two checkpoints took 19.7 CPU-seconds with 64 sequences and 55.9 with the "
        "whole split (215 sequences), measured on a shared 2-core machine.",
        f"- Final losses (the summary's signature 5): the whole validation split{whole}.",
    ]


def _disclaimer(cfg, summaries: dict) -> list[str]:
    m, t = cfg.model, cfg.training
    steps = summaries["intervention"].get("steps", t.train_steps)
    return [
        f"> **Not the paper's results.** A {m.num_layers}-layer model trained for {steps} steps "
        f"on a CPU, one seed per arm: this report shows the pipeline and what each of the "
        "paper's signatures looks like at toy scale. Every difference below is set against a "
        "yardstick (a standard error over held-out sequences computed in this run, or a seed "
        "spread measured in docs/MINI_STUDY.md) and marked *appeared*, *within noise* or "
        "*absent*. One seed cannot show the seed-to-seed variation, which docs/MINI_STUDY.md "
        "measures for a 12-layer setting.",
    ]


def write_report(
    out: Path,
    run_dirs: dict[str, Path],
    corpus: dict,
    data_summary: dict,
    final: dict | None = None,
    ablation_sequences: int | None = None,
) -> Path:
    """Write ``out/report.md`` (and the figures under ``out/figures``); return its path.

    Args:
        final: the whole-split evaluation (:func:`megatron_qk.quickstart_eval.evaluate_final`).
        ablation_sequences: the ablation's sample size the quickstart asked for.
    """
    comparison = load_and_compare([str(p) for p in run_dirs.values()])
    (out / "compare.json").write_text(json.dumps(comparison, indent=1) + "\n", encoding="utf-8")
    figures = plot_runs(list(run_dirs.values()), out / "figures")
    cfg = load_resolved_config(run_dirs["intervention"] / "config.yaml")
    m, t = cfg.model, cfg.training
    summaries = {
        arm: json.loads((d / "summary.json").read_text(encoding="utf-8"))
        for arm, d in run_dirs.items()
    }
    rule = cfg.optim.rules[0]
    release = summaries["intervention"]["release"].get(rule.name)
    replay = replay_run(run_dirs["intervention"] / "metrics.jsonl", rule=rule.name)
    if rule.threshold_mode == "over_uniform":
        threshold = f"lower_copy / lower_copy_uniform >= {rule.threshold_ratio}"
    else:
        threshold = f"threshold {rule.threshold}"
    evals = t.eval_iters * t.global_batch_size
    lines = [
        "# megatron-qk quickstart report",
        "",
        *_disclaimer(cfg, summaries),
        "",
        *signature_lines(run_dirs, summaries, rule, final),
        "",
        "## Setting",
        "",
        f"Corpus: {corpus.get('source')}; {data_summary.get('documents', '?'):,} documents, "
        f"{data_summary.get('tokens', 0):,} GPT-2 tokens (train + valid via `megatron-qk "
        "preprocess`).",
        f"Model: GPT-style decoder, {m.num_layers} layers, width {m.hidden_size}, "
        f"{m.num_attention_heads} heads, {m.ffn.upper()} FFN {m.ffn_hidden_size}, "
        f"{m.normalization}, seq {m.seq_length}; {t.train_steps} steps of {t.global_batch_size} "
        f"sequences per arm, data-parallel over {_world_size(run_dirs['intervention'])} "
        "processes.",
        f"Intervention: `{rule.name}`: upper-half {'/'.join(rule.roles)} at lr x{rule.multiplier},"
        f" {rule.release} release ({threshold}, patience {rule.patience}, window "
        f"[{rule.min_frac}, {rule.max_frac}]), ramp {rule.ramp_frac}.",
        "",
        "## Final loss on the whole validation split",
        "",
        *_final_lines(final),
        "",
        "## Paired comparison (`megatron-qk compare`)",
        "",
        f"Losses and perplexities here are the training's last evaluation, on its evaluation "
        f"sample ({evals} sequences, {evals * m.seq_length:,} tokens), and the tokens-to-target "
        "columns read the same noisy curve: judge a difference by the whole-split section "
        "above.",
        "",
        format_table(comparison),
        "",
        "## Release (`release` lines; `megatron-qk replay-release`)",
        "",
    ]
    score = release and release.get("score")
    score = "n/a" if score is None else f"{score:.4f}"
    if release is None:
        lines.append("The intervention run logged no release.")
    else:
        lines.append(
            f"`{rule.name}` released at step {release['step']} (frac {release['frac']:.3f}, "
            f"reason: {release['reason']}, last maturity score {score}, threshold "
            f"{release.get('threshold')}). Replaying the rule on the logged lower-copy scores "
            f"gives step {(replay['replayed'] or {}).get('step')}: "
            f"{'agrees' if replay['agrees'] else 'DISAGREES'} with the run."
        )
    for arm, summary in summaries.items():
        crossing = summary.get("sharp_entropy_crossing")
        where = (
            f"step {crossing['step']} (frac {crossing['frac']:.3f})" if crossing else "not reached"
        )
        lines.append(
            f"- {arm}: upper entropy below {cfg.diagnostics.sharp_entropy_threshold} "
            f"(sharp-entropy crossing): {where}"
        )
    lines += ["", "## Mechanism readouts at ~3% of training (`diag` lines)", ""]
    lines += _readout_table(run_dirs, 0.03)
    lines += ["", "At the end of training:", ""]
    lines += _readout_table(run_dirs, 1.0)
    lines += [
        "",
        "## Upper Q/K ablation and locality over checkpoints (`megatron-qk diagnose`)",
        "",
        ABLATION_NOTE,
        "",
        *_ablation_lines(run_dirs),
        "",
        "## Sample sizes",
        "",
        *_sample_lines(cfg, final, ablation_sequences),
        "",
        "## Figure 3 panels (`megatron-qk plot`)",
        "",
        f"![Figure 3]({figures['figure3'].relative_to(out).as_posix()})",
        "",
    ]
    for name, title in PANELS.items():
        lines.append(f"- [{title}]({figures[name].relative_to(out).as_posix()})")
    lines += [
        "",
        "Runs: " + ", ".join(f"`{d.relative_to(out).as_posix()}`" for d in run_dirs.values()),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
