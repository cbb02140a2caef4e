"""The quickstart's final evaluation: each arm's last checkpoint on the whole validation split.

The training runs evaluate on ``eval_iters x global_batch_size`` sequences (16 in the
quickstart, 2,048 tokens): enough to follow the loss curve, too few to tell two arms apart by a
few thousandths of a nat. This stage scores both arms' final checkpoints on every sequence of
the validation split (one epoch of the run's own validation dataset, no sequence twice), keeps
the per-sequence loss sums, and gives each arm's loss with its standard error over sequences
and the paired difference of the two arms with its standard error (the same sequences score
both models, so the sequences are the sampling unit).

*Standard error.* The loss is a ratio ``L = sum(s_i) / sum(n_i)`` of per-sequence loss sums
``s_i`` and token counts ``n_i``; by the delta method its per-sequence influence is
``psi_i = (s_i - L n_i) / mean(n)`` and its standard error ``sqrt(sum(psi_i^2) / (N (N - 1)))``;
for the paired difference ``L_a - L_b`` the influence is ``psi_a,i - psi_b,i``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_qk.analysis.diagnose import heldout_batches
from megatron_qk.diagnostics.ablation import sequence_losses
from megatron_qk.rundir.atomic import write_text_atomic
from megatron_qk.rundir.layout import list_checkpoints
from megatron_qk.training.restore import load_checkpoint_for_analysis

FINAL_EVAL_FILE = "final_eval.json"
# More than any quickstart validation split holds: heldout_batches stops at the split's end.
_WHOLE_SPLIT = 10**9


def _influence(sums: list[float], counts: list[float]) -> tuple[float, list[float]]:
    total = sum(counts)
    if total == 0:
        raise ValueError("no loss tokens in the validation sequences")
    loss = sum(sums) / total
    mean_n = total / len(counts)
    return loss, [(s - loss * n) / mean_n for s, n in zip(sums, counts)]


def _se(psi: list[float]) -> float:
    n = len(psi)
    return math.sqrt(sum(p * p for p in psi) / (n * (n - 1))) if n > 1 else math.nan


def loss_with_se(sums: list[float], counts: list[float]) -> tuple[float, float]:
    """Token-weighted mean loss over sequences and its standard error (NaN for one sequence)."""
    loss, psi = _influence(sums, counts)
    return loss, _se(psi)


def paired_difference(
    sums_a: list[float], sums_b: list[float], counts: list[float]
) -> tuple[float, float]:
    """``L_a - L_b`` on the same sequences and its paired standard error."""
    if not len(sums_a) == len(sums_b) == len(counts):
        raise ValueError("the two arms were not scored on the same sequences")
    loss_a, psi_a = _influence(sums_a, counts)
    loss_b, psi_b = _influence(sums_b, counts)
    return loss_a - loss_b, _se([a - b for a, b in zip(psi_a, psi_b)])


def score_final_checkpoint(run_dir: Path, batch_size: int = 8) -> dict:
    """Per-sequence loss sums of a run's last checkpoint on its whole validation split."""
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate")
    loaded = load_checkpoint_for_analysis(checkpoints[-1])
    sums: list[float] = []
    counts: list[float] = []
    for batch in heldout_batches(loaded, None, _WHOLE_SPLIT, batch_size):
        s, n = sequence_losses(loaded.model, batch)
        sums += s.tolist()
        counts += n.tolist()
    return {"checkpoint": str(checkpoints[-1]), "step": loaded.step, "sums": sums, "counts": counts}


def summarize(scores: dict[str, dict], control: str = "control") -> dict:
    """Losses, perplexities and the paired difference of every arm against ``control``."""
    counts = scores[control]["counts"]
    out = {"sequences": len(counts), "tokens": int(sum(counts)), "arms": {}, "differences": {}}
    for arm, score in scores.items():
        if score["counts"] != counts:
            raise ValueError(f"{arm} was not scored on the control's sequences")
        loss, se = loss_with_se(score["sums"], counts)
        out["arms"][arm] = {
            "step": score["step"],
            "loss": loss,
            "loss_se": se,
            "ppl": math.exp(loss),
        }
        if arm != control:
            diff, diff_se = paired_difference(score["sums"], scores[control]["sums"], counts)
            out["differences"][arm] = {"loss": diff, "se": diff_se}
    return out


def evaluate_final(run_dirs: dict[str, Path], out: Path) -> dict:
    """Score every arm's last checkpoint (reusing ``out`` when it holds those checkpoints).

    Returns:
        :func:`summarize` of the scores, which are kept in ``out`` (JSON).
    """
    want = {arm: str(list_checkpoints(d / "checkpoints")[-1]) for arm, d in run_dirs.items()}
    scores = None
    if out.exists():
        scores = json.loads(out.read_text(encoding="utf-8")).get("scores")
        if {arm: s["checkpoint"] for arm, s in (scores or {}).items()} != want:
            scores = None
    if scores is None:
        scores = {arm: score_final_checkpoint(d) for arm, d in run_dirs.items()}
        write_text_atomic(out, json.dumps({"scores": scores}) + "\n")
    return summarize(scores)
