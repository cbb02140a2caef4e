"""The plan of the paper's tables before any GPU is spent (``DRY_RUN=1 run_table.sh``, torch-free).

Every recipe of every table directory, for every seed, resolves to a run; two runs whose
resolved configs agree apart from labels (``name``, ``arm``, where they live, logging: see
:mod:`megatron_qk.config.identity`) are one training, trained once and linked into every table
that needs it. ``separate=True`` (``SEPARATE_RUNS=1``) keeps runs with another ``arm`` label
apart, as a separate training each.

The cost of a run is read from its recipe, never measured:

    training FLOPs   = trained tokens x flops_per_token      (Megatron-LM's formula,
                                                                :mod:`megatron_qk.models.flops`)
    evaluation FLOPs = evaluations x eval_iters x global batch x seq x flops_per_token / 3
                       (forward only)
    GPU-hours        = FLOPs / (MFU x peak TFLOP/s x 1e12 x 3600)

with trained tokens = the steps the run trains (``stop_at_frac`` included) x tokens per step. The
mechanism probes of each evaluation and checkpoint writes are left out.

Usage: ``megatron-qk table all --plan [--mfu 0.4] [--peak 989] [--separate]`` (or
``TABLE=all DRY_RUN=1 bash examples/launch/run_table.sh``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from megatron_qk.config.identity import config_hash
from megatron_qk.config.loader import config_to_dict, load_config
from megatron_qk.models.flops import flops_per_token
from megatron_qk.training.checkpoint_plan import end_step
from megatron_qk.training.eval_plan import evaluation_steps

DEFAULT_MFU = 0.40
CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
# The arm label a run is hashed under when relabelled runs are shared (not a real arm).
SHARED_ARM = "<any>"


@dataclass
class PlannedRun:
    """One run of one table: where it goes, what it costs, which training it is."""

    table: str
    out: str
    recipe: str
    seed: int
    key: str
    steps: int
    tokens: int
    flops: float
    parameters_note: str = ""
    shared_with: str | None = None  # the run directory it is linked to (None: trained)
    labels: list[str] = field(default_factory=list)


def table_seeds(table_dir: Path, seeds: str | None = None) -> list[int]:
    """The seeds of a table: ``seeds`` (e.g. ``"1 2 3"``) or its ``seeds`` file, else [1]."""
    text = seeds if seeds is not None else None
    if text is None:
        path = table_dir / "seeds"
        text = path.read_text(encoding="utf-8") if path.is_file() else "1"
    values = text.split()
    for value in values:
        if not value.isdigit():
            raise ValueError(f"seed {value!r} is not a non-negative integer ({table_dir})")
    return [int(v) for v in values]


def table_recipes(table_dir: Path) -> list[tuple[str, str, Path]]:
    """``(group, arm label, recipe)`` of every recipe of a table, in run_table.sh's order."""
    out = []
    for recipe in sorted(table_dir.rglob("*.yaml"), key=lambda p: str(p)):
        group = str(recipe.parent.relative_to(table_dir))
        out.append((group, recipe.stem, recipe))
    return out


def _padded_vocab(cfg) -> int:
    multiple = cfg.model.vocab_pad_multiple * cfg.parallel.tensor_model_parallel_size
    return -(-cfg.model.vocab_size // multiple) * multiple


def plan_run(recipe: Path, seed: int, overrides: list[str], separate: bool) -> tuple:
    """``(identity key, steps, trained tokens, FLOPs)`` of one recipe and seed."""
    cfg = load_config(str(recipe), [f"training.seed={seed}", *overrides])
    data = config_to_dict(cfg)
    if not separate:
        data["arm"] = SHARED_ARM
    fpt = flops_per_token(cfg.model, _padded_vocab(cfg))
    steps = end_step(cfg)
    tokens = steps * cfg.tokens_per_step()
    t = cfg.training
    evals = len(evaluation_steps(cfg))
    eval_tokens = evals * t.eval_iters * t.global_batch_size * cfg.model.seq_length
    return config_hash(data), steps, tokens, float(tokens * fpt + eval_tokens * fpt / 3)


def build_plan(
    table_dirs: list[Path],
    runs_dir: str = "runs",
    seeds: str | None = None,
    overrides: list[str] | None = None,
    separate: bool = False,
) -> list[PlannedRun]:
    """Every run of the tables, in order; a run identical to an earlier one is ``shared_with``."""
    first: dict[str, PlannedRun] = {}
    plan = []
    for table_dir in table_dirs:
        for group, arm, recipe in table_recipes(table_dir):
            for seed in table_seeds(table_dir, seeds):
                out = str(Path(runs_dir, table_dir.name, group, f"{arm}-s{seed}")).replace(
                    "/./", "/"
                )
                key, steps, tokens, flops = plan_run(recipe, seed, overrides or [], separate)
                run = PlannedRun(table_dir.name, out, str(recipe), seed, key, steps, tokens, flops)
                if key in first:
                    run.shared_with = first[key].out
                    first[key].labels.append(out)
                else:
                    first[key] = run
                plan.append(run)
    return plan


def gpu_hours(flops: float, mfu: float, peak_tflops: float) -> float:
    """GPU-hours of ``flops`` at ``mfu`` of a ``peak_tflops`` GPU."""
    return flops / (mfu * peak_tflops * 1e12 * 3600.0)


def format_plan(plan: list[PlannedRun], mfu: float, peak: float) -> str:
    """The plan as text: every distinct run once, the shared ones, cost per table and in all."""
    lines = [
        f"Cost model: GPU-hours = (tokens x FLOPs/token + evaluation forwards) / ({mfu:.0%} MFU x "
        f"{peak:g} TFLOP/s); FLOPs/token from Megatron-LM's formula (models/flops.py).",
        "",
        "| run | seed | steps | tokens | PFLOP | GPU-hours | also serves |",
        "|---|---|---|---|---|---|---|",
    ]
    per_table: dict[str, float] = {}
    for run in plan:
        if run.shared_with is not None:
            continue
        hours = gpu_hours(run.flops, mfu, peak)
        per_table[run.table] = per_table.get(run.table, 0.0) + hours
        also = ", ".join(run.labels) or "-"
        lines.append(
            f"| {run.out} | {run.seed} | {run.steps:,} | {run.tokens:,} | "
            f"{run.flops / 1e15:,.0f} | {hours:.2f} | {also} |"
        )
    shared = [r for r in plan if r.shared_with is not None]
    saved = sum(gpu_hours(r.flops, mfu, peak) for r in shared)
    lines += ["", f"{len(plan) - len(shared)} distinct runs; {len(shared)} linked, not retrained "
              f"({saved:.1f} GPU-hours saved):"]  # fmt: skip
    lines += [f"  {r.out} -> {r.shared_with}" for r in shared]
    lines += ["", "| table | GPU-hours (its own runs) |", "|---|---|"]
    lines += [f"| {t} | {h:.1f} |" for t, h in per_table.items()]
    total = sum(per_table.values())
    lines.append(f"| all | {total:.1f} |")
    return "\n".join(lines)


def resolve_tables(names: list[str]) -> list[Path]:
    """Table directories by path or by name under examples/configs; none: every table."""
    if not names:  # in the paper's order (Table 1 first: it trains the runs others link)
        tables = [p for p in CONFIGS.iterdir() if p.is_dir() and p.name.startswith("table")]
        return sorted(tables, key=lambda p: (int(re.match(r"table(\d+)", p.name)[1]), p.name))
    out = []
    for name in names:
        path = Path(name)
        if not path.is_dir():
            path = CONFIGS / name
        if not path.is_dir():
            raise ValueError(f"no table directory {name} (looked in examples/configs/)")
        out.append(path.resolve())
    return out
