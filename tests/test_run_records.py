"""metrics.jsonl line builders: field names and order of each kind, and torch-free import."""

from __future__ import annotations

import subprocess
import sys

from megatron_qk.rundir.records import (
    Position,
    diag_record,
    eval_record,
    event_record,
    release_record,
    train_record,
)

AT = Position.after(3, planned_steps=12, tokens_per_step=256)


def test_position_counts_tokens_by_step():
    assert (AT.step, AT.frac, AT.tokens) == (3, 0.25, 768)


def test_each_kind_keeps_its_field_order():
    train = train_record(
        AT,
        loss=2.0,
        lr=1e-3,
        grad_norm=None,
        step_seconds=0.5,
        throughput={"tokens_per_second": 1.0, "mfu": 0.1},
        multipliers={"upper_qk": 0.25},
    )
    assert list(train) == [
        "kind", "step", "tokens", "frac", "loss", "lr", "grad_norm", "step_seconds",
        "tokens_per_second", "mfu", "mult/upper_qk",
    ]  # fmt: skip
    assert list(eval_record(AT, val_loss=1.0)) == [
        "kind", "step", "tokens", "frac", "val_loss", "val_ppl",
    ]  # fmt: skip
    diag = diag_record(AT, sequences=8, statistics={"lower_copy": 0.1, "layers": {}})
    assert list(diag) == ["kind", "step", "tokens", "frac", "sequences", "lower_copy", "layers"]
    fixed = release_record(AT, rule="r", reason="fixed", threshold=None)
    assert list(fixed) == ["kind", "rule", "reason", "step", "frac", "tokens"]
    maturity = release_record(
        AT, rule="r", reason="maturity", score=0.2, threshold=0.1, threshold_mode="absolute"
    )
    assert list(maturity)[6:] == ["score", "threshold", "threshold_mode"]
    event = event_record("preempted", AT, signal="SIGTERM", checkpoint="c")
    assert list(event) == ["kind", "event", "step", "frac", "tokens", "signal", "checkpoint"]


def test_eval_perplexity_saturates_instead_of_overflowing():
    assert eval_record(AT, val_loss=1e6)["val_ppl"] == eval_record(AT, val_loss=700.0)["val_ppl"]


def test_records_import_without_torch():
    code = "import sys, megatron_qk.rundir.records; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
