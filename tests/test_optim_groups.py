"""Multiplier rules inside Megatron's optimizer: first-step updates, resume, group identities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_qk.config.loader import load_config
from megatron_qk.training.entry import train_from_config


def _cfg(tmp_path: Path, name: str, *overrides: str):
    return load_config(
        "tiny",
        [
            f"training.output_dir={tmp_path / name}",
            "training.train_steps=12",
            "training.eval_interval=2",
            "logging.progress_bar=false",
            *overrides,
        ],
    )


def _first_update(
    tmp_path: Path, name: str, *overrides: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parameter change of the first optimizer step and the weights before it, by name."""
    from megatron_qk.training.distributed import setup_distributed
    from megatron_qk.training.loop import Trainer

    # No warmup: Megatron's first warmup step has lr 0, which would make every update zero.
    # No clipping: the global grad norm is summed in group order, so regrouping parameters
    # moves its last bits and the clip factor with it; without clipping updates are exact.
    cfg = _cfg(tmp_path, name, "optim.warmup_frac=0", "optim.clip_grad=0", *overrides)
    trainer = Trainer(cfg, setup_distributed(cfg))
    model = trainer.model_chunks[0].module
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, before


def _update_rounding_bound(before: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |rule_delta - 0.25 * control_delta| from fp32 rounding alone.

    Adam's step direction m / (sqrt(v) + eps) is bitwise the same in both runs and the
    learning-rate factor 0.25 is a power of two, so the two updates differ only in how the new
    weight is rounded. Each run rounds the weight twice (decoupled weight decay, then the Adam
    step), each rounding off by at most half an ulp of a value below |p| + |delta|, and the
    control's error enters scaled by 0.25: (2 * 0.5) * (1 + 0.25) ulp < 2 * eps32 * (|p| + |d|).
    A wrong multiplier (0.26 instead of 0.25) misses by 0.01 * |delta|, orders of magnitude above
    this bound at the tiny preset's learning rate; the test checks that too.
    """
    eps32 = torch.finfo(torch.float32).eps
    return 2 * eps32 * (before.abs() + delta.abs())


@pytest.mark.parametrize(
    ("distopt", "biases"), [(False, False), (True, False), (False, True)], ids=str
)
def test_first_step_update_is_multiplier_times_control(tmp_path, single_rank, distopt, biases):
    """Selected tensors move by exactly 0.25x the control's update; all others identically.

    By default the rule slows the paper's "W_Q and W_K" (weights); ``biases: true`` adds the
    Q/K biases.
    """
    common = (f"parallel.use_distributed_optimizer={str(distopt).lower()}",)
    control, before = _first_update(tmp_path, "control", *common)
    flag = ", biases: true" if biases else ""
    rule, _ = _first_update(tmp_path, "rule", *common, f"optim.rules=[{{name: upper_qk{flag}}}]")
    selected = set()
    for name, delta in control.items():
        upper = any(f"decoder.layers.{i}." in name for i in (2, 3))  # layers 3, 4 of 4
        is_qk = ".linear_q." in name or ".linear_k." in name
        is_qk = is_qk and (biases or name.endswith(".weight"))
        assert delta.abs().max() > 0, name
        if upper and is_qk:
            selected.add(name)
            bound = _update_rounding_bound(before[name], delta)
            excess = (rule[name] - 0.25 * delta).abs() - bound
            assert excess.max() <= 0, f"{name}: off by {excess.max():.3e} beyond fp32 rounding"
            # The bound is strict enough to see a multiplier 4% off.
            assert ((rule[name] - 0.26 * delta).abs() > bound).any(), name
        else:
            torch.testing.assert_close(rule[name], delta, rtol=0, atol=0)
    # upper layers' q and k weights (+ biases): 2 layers x 2 roles x (1 or 2) tensors
    assert len(selected) == (8 if biases else 4)
    assert any(".linear_v." in n and "layers.3." in n for n in control)


def test_group_collision_is_refused():
    """Two groups with the same checkpoint identity would swap state on load: refuse them."""
    from megatron_qk.optim.param_groups import check_group_identities

    class Fake:
        param_groups = [
            {"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False},
            {"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False},
        ]

    with pytest.raises(RuntimeError, match="share the checkpoint identity"):
        check_group_identities(Fake())
    Fake.param_groups[1]["lr_mult"] = "mqk_rule:upper_qk"
    check_group_identities(Fake())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _comparable(records: list[dict]) -> list[tuple]:
    out = []
    for r in records:
        if r["kind"] == "train":
            out.append(("train", r["step"], r["loss"], r["mult/upper_qk"], r["lr"]))
        elif r["kind"] == "eval":
            out.append(("eval", r["step"], r["val_loss"]))
        elif r["kind"] == "diag":
            out.append(("diag", r["step"], r["lower_copy"]))
        elif r["kind"] == "release":
            out.append(("release", r["rule"], r["reason"], r["step"]))
    return out


# Maturity with a low threshold: evaluations at steps 4 and 6 (fracs 0.33, 0.5) are inside the
# window, so the rule releases at step 6 and ramps over 3 steps (0.25 of 12).
RULE = (
    "optim.rules=[{name: upper_qk, threshold: 0.01, patience: 2, min_frac: 0.3, max_frac: 0.9, "
    "ramp_frac: 0.25}]"
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref")
    summary = train_from_config(_cfg(path, "run", RULE))
    return _comparable(_metrics(path / "run")), summary


@pytest.mark.parametrize("stop_after", [3, 7, 10], ids=["hold", "ramp", "after"])
def test_resume_equals_uninterrupted(tmp_path, uninterrupted, stop_after):
    ref, ref_summary = uninterrupted
    releases = [r for r in ref if r[0] == "release"]
    assert releases == [("release", "upper_qk", "maturity", 6)]
    first = _cfg(tmp_path, "run", RULE, f"training.exit_after_steps={stop_after}")
    train_from_config(first)
    summary = train_from_config(_cfg(tmp_path, "run", RULE))
    got = _comparable(_metrics(tmp_path / "run"))
    assert [g[:2] for g in got] == [r[:2] for r in ref]
    for a, b in zip(ref, got):
        assert b[:2] == a[:2]
        # The resumed run repeats the uninterrupted run's fp32 operations in the same order
        # (tests/test_training.py asserts bitwise equality); rel 1e-6 (~16 fp32 ulps) is far
        # below the >1% change a wrong multiplier or schedule after resume would cause.
        want = [x if isinstance(x, str) else pytest.approx(x, rel=1e-6) for x in a[2:]]
        assert list(b[2:]) == want, (a, b)
    assert summary["release"] == ref_summary["release"]
    assert summary["release"]["upper_qk"]["step"] == 6


def test_groups_keep_their_learning_rates_after_reload(tmp_path, single_rank):
    """After loading a checkpoint taken in the hold, the rule group runs at 0.25x the base lr."""
    from megatron_qk.training.distributed import setup_distributed
    from megatron_qk.training.loop import Trainer

    hold = ("optim.rules=[{name: upper_qk, release: fixed, release_frac: 0.9}]",)
    train_from_config(_cfg(tmp_path, "run", *hold, "training.exit_after_steps=3"))
    cfg = _cfg(tmp_path, "run", *hold)
    trainer = Trainer(cfg, setup_distributed(cfg))
    assert trainer.maybe_resume() and trainer.step == 3
    groups = trainer.optimizer.param_groups
    base = [g["lr"] for g in groups if not g.get("mqk_rule")]
    ruled = [g["lr"] for g in groups if g.get("mqk_rule") == "upper_qk"]
    assert base and ruled and len(set(base)) == 1
    assert ruled == pytest.approx([0.25 * base[0]] * len(ruled))
    # Upper layers 3-4: W_Q and W_K weights (their biases stay at the full rate by default).
    assert sum(len(g["params"]) for g in groups if g.get("mqk_rule")) == 4


def test_entropy_floor_pushes_only_attention_and_vanishes_above_the_floor(tmp_path, single_rank):
    """With h0 above the upper entropy the floor's gradient changes the first update of upper
    W_Q (and whatever feeds upper Q/K) but not the top layer's V or FFN; with h0 = 0 the penalty
    is max(0, negative) = 0 and the update equals the control's exactly."""
    control, _ = _first_update(tmp_path, "control")
    floor_on = "optim.entropy_floor.enabled=true"
    idle, _ = _first_update(tmp_path, "idle", floor_on, "optim.entropy_floor.h0=0.0")
    for name, delta in control.items():
        torch.testing.assert_close(idle[name], delta, rtol=0, atol=0)
    # A strong floor (lam 50) so its gradient dominates Adam's normalised first step.
    active, _ = _first_update(
        tmp_path, "active", floor_on, "optim.entropy_floor.h0=1.5", "optim.entropy_floor.lam=50"
    )
    upper_q = "decoder.layers.3.self_attention.linear_qkv.linear_q.weight"
    assert not torch.equal(active[upper_q], control[upper_q])
    # The penalty depends on upper-layer Q and K only; V of the top layer and the top FFN get
    # no gradient from it, so their first update is exactly the control's.
    for unaffected in (
        "decoder.layers.3.self_attention.linear_qkv.linear_v.weight",
        "decoder.layers.3.mlp.linear_fc2.weight",
    ):
        torch.testing.assert_close(active[unaffected], control[unaffected], rtol=0, atol=0)
