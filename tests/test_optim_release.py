"""Release state machine and the multiplier scheduler (pure: no model, no processes)."""

from __future__ import annotations

import json
import math

import pytest

from megatron_qk.config.optim import EntropyFloorConfig, MultiplierRuleConfig, OptimConfig
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.config.training import TrainingConfig
from megatron_qk.optim.release import ReleaseController
from megatron_qk.optim.scheduler import RULE_KEY, build_scheduler
from megatron_qk.training.losses import entropy_floor_penalty

PLANNED = 1000  # steps; an evaluation every 5 steps is every 0.5% of training


def _run(ctl: ReleaseController, scores, eval_every=5, start=1, stop=PLANNED, log=None):
    """Drive a controller like the training loop: on_step every step, observe at evaluations.

    ``scores(step)`` gives the lower-copy score of the evaluation after ``step``.
    """
    events = []
    for step in range(start, stop + 1):
        frac = step / ctl.planned_steps
        ev = ctl.on_step(step, frac)
        if ev:
            events.append(ev)
        if step % eval_every == 0:
            ev = ctl.observe(step, frac, scores(step))
            if ev:
                events.append(ev)
        if log is not None:
            log.append(ctl.factor(step))
    return events


def _paper_rule(**kw) -> ReleaseController:
    return ReleaseController.from_rule(MultiplierRuleConfig(**kw), PLANNED)


def test_defaults_match_the_paper():
    rule = MultiplierRuleConfig()
    assert (rule.multiplier, rule.threshold, rule.patience) == (0.25, 0.005, 3)
    assert (rule.min_frac, rule.max_frac, rule.ramp_frac) == (0.03, 0.12, 0.01)
    assert rule.roles == ["q", "k"] and rule.layers == "upper_half"


def test_hold_below_threshold_until_forced_release_at_max_frac():
    ctl = _paper_rule()
    factors: list[float] = []
    # Evaluations every 7 steps, so the forced step (120 = 12%) is not an evaluation step.
    events = _run(ctl, lambda s: 0.004, eval_every=7, log=factors)
    assert len(events) == 1
    ev = events[0]
    assert (ev.rule, ev.reason, ev.step) == ("upper_qk", "forced", 120)
    assert ev.frac == 0.12  # 120 / 1000 rounds once, to the double nearest 0.12: the literal
    assert all(f == 0.25 for f in factors[:120])  # hold through step 120 (ramp starts there)
    assert ctl.streak == 0


def test_earliest_maturity_release_is_about_4_percent():
    # Mature from the very first evaluation: only the in-window evaluations at 3.0, 3.5 and
    # 4.0% count, so the release is at 4% (the paper's 4.01%).
    ctl = _paper_rule()
    events = _run(ctl, lambda s: 0.5)
    assert [(e.reason, e.step) for e in events] == [("maturity", 40)]
    assert events[0].frac == 0.04  # 40 / 1000: correctly rounded, as the literal


@pytest.mark.parametrize(("patience", "step"), [(1, 30), (3, 40), (5, 50)])
def test_patience_sets_the_release_point(patience, step):
    # Appendix F, Table 8: no patience releases at 3.00%, patience 5 later than patience 3.
    events = _run(_paper_rule(patience=patience), lambda s: 0.5)
    assert [e.step for e in events] == [step]


def test_lowering_the_threshold_does_not_move_the_release_earlier():
    scores = lambda s: 0.004 if s < 20 else 0.006  # noqa: E731
    main = _run(_paper_rule(), scores)
    lower = _run(_paper_rule(threshold=0.003), scores)
    assert [e.step for e in main] == [e.step for e in lower] == [40]


def test_a_dip_resets_patience():
    # In-window evaluations at 30, 35, 40, 45, ...: above, above, dip, then above x3.
    dips = {40}
    events = _run(_paper_rule(), lambda s: 0.001 if s in dips else 0.01)
    assert [(e.reason, e.step) for e in events] == [("maturity", 55)]


def test_nan_score_counts_as_not_mature():
    events = _run(_paper_rule(), lambda s: math.nan if s == 35 else 0.01)
    assert [e.step for e in events] == [50]


def test_evaluations_outside_the_window_neither_count_nor_reset():
    ctl = _paper_rule()
    for step in (5, 10, 25):  # before 3%
        assert ctl.observe(step, step / PLANNED, 1.0) is None
    assert ctl.streak == 0
    ctl.observe(30, 0.030, 1.0)
    ctl.observe(35, 0.035, 1.0)
    assert ctl.streak == 2
    assert ctl.observe(35, 0.035, 1.0) is None  # repeated evaluation of one step: ignored
    assert ctl.streak == 2
    ev = ctl.observe(40, 0.040, 1.0)
    assert ev is not None and ev.step == 40


def test_ramp_shape():
    ctl = _paper_rule()  # ramp over round(0.01 * 1000) = 10 steps
    ctl.observe(30, 0.03, 1)
    ctl.observe(35, 0.035, 1)
    assert ctl.observe(40, 0.04, 1).step == 40
    assert ctl.ramp_steps == 10
    assert ctl.factor(39) == 0.25
    assert ctl.factor(40) == 0.25
    for i in range(11):
        # t = i/10, (1 - 0.25) * t and the sum round once each (<= U64 on values <= 1), the
        # expected's division and sum likewise: <= 5 U64 ~ 5.6e-16.
        assert ctl.factor(40 + i) == pytest.approx(0.25 + 0.75 * i / 10, abs=1e-15)
    assert ctl.factor(50) == 1.0 and ctl.factor(999) == 1.0
    steps = [ctl.factor(s) for s in range(35, 60)]
    assert steps == sorted(steps)


def test_zero_ramp_releases_at_once():
    ctl = _paper_rule(ramp_frac=0.0)
    ctl.on_step(120, 0.12)
    assert ctl.factor(119) == 0.25 and ctl.factor(120) == 1.0


def test_over_uniform_rule_compares_the_ratio_to_the_baseline():
    """Relative threshold on a synthetic score sequence: the ratio decides, not the raw score."""
    ctl = _paper_rule(threshold_mode="over_uniform", threshold_ratio=1.3)
    assert ctl.compared_threshold == 1.3
    uniform = 0.02  # e.g. seq 128: four times the paper's absolute 0.005
    # The raw score is above 0.005 from the start, but its ratio only reaches 1.3 at step 60.
    events = []
    for step in range(1, PLANNED + 1):
        frac = step / PLANNED
        ev = ctl.on_step(step, frac)
        if step % 5 == 0 and ev is None:
            ratio = 1.0 if step < 60 else 1.5
            ev = ctl.observe(step, frac, uniform * ratio, uniform)
        if ev:
            events.append(ev)
    assert [(e.step, e.reason) for e in events] == [(70, "maturity")]  # 60, 65, 70
    assert events[0].threshold == 1.3 and events[0].threshold_mode == "over_uniform"
    # (0.02 * 1.5) / 0.02: two roundings, (1 + U64)^2 - 1 < 3 U64.
    assert events[0].score == pytest.approx(1.5, rel=3 * 2.0**-53)
    # The paper's absolute rule on the same scores releases at the first in-window patience.
    absolute = _paper_rule()
    first = _run(absolute, lambda step: uniform, eval_every=5)
    assert (first[0].step, first[0].reason, first[0].score) == (40, "maturity", uniform)
    # Without the baseline (or with a zero one) the ratio is undefined: never counts.
    assert math.isnan(ctl.maturity_score(0.01))
    assert math.isnan(ctl.maturity_score(0.01, 0.0))
    nobase = _paper_rule(threshold_mode="over_uniform", threshold_ratio=1.3)
    assert [e.reason for e in _run(nobase, lambda step: 1.0)] == ["forced"]


def test_threshold_mode_is_validated():
    with pytest.raises(ValueError, match="threshold_ratio"):
        _paper_rule(threshold_mode="over_uniform")
    with pytest.raises(ValueError, match="threshold_mode"):
        _paper_rule(threshold_mode="relative")
    from megatron_qk.config.errors import ConfigError

    with pytest.raises(ConfigError, match="threshold_ratio"):
        MultiplierRuleConfig(threshold_mode="over_uniform")
    with pytest.raises(ConfigError, match="threshold_ratio"):
        MultiplierRuleConfig(threshold_ratio=1.3)  # a ratio with the absolute mode
    with pytest.raises(ConfigError, match="threshold_ratio"):
        EntropyFloorConfig(threshold_mode="over_uniform", threshold_ratio=0.0)
    rule = MultiplierRuleConfig(threshold_mode="over_uniform", threshold_ratio=1.3)
    assert ReleaseController.from_rule(rule, 100).compared_threshold == 1.3


def test_fixed_release_ignores_scores():
    ctl = _paper_rule(release="fixed", release_frac=0.06)
    events = _run(ctl, lambda s: 1.0)
    assert [(e.reason, e.step) for e in events] == [("fixed", 60)]
    assert ctl.factor(59) == 0.25 and ctl.factor(70) == 1.0


def test_never_keeps_the_multiplier():
    ctl = _paper_rule(release="never", multiplier=0.5)
    factors: list[float] = []
    assert _run(ctl, lambda s: 1.0, log=factors) == []
    assert set(factors) == {0.5}


def test_entropy_floor_weight_ramps_to_zero():
    ctl = ReleaseController.for_entropy_floor(EntropyFloorConfig(enabled=True), PLANNED)
    events = _run(ctl, lambda s: 0.5)
    assert [(e.rule, e.step) for e in events] == [("entropy_floor", 40)]
    # 1 + (0 - 1) * (5 / 10) is dyadic throughout: exact.
    assert ctl.factor(40) == 1.0 and ctl.factor(45) == 0.5 and ctl.factor(50) == 0
    import torch

    h = torch.tensor([0.5, 0.9], requires_grad=True)
    pen = entropy_floor_penalty(h, h0=0.8, weight=0.1)
    # fp32: 0.8 and 0.1 are stored within U32 relative, 0.8 - 0.5 and the product round once
    # each, and the literal 0.03: <= 0.1 * 0.8 U32 + 0.03 * 4 U32 ~ 1.2e-8 (U32 = 2^-24).
    assert torch.allclose(pen, torch.tensor([0.03, 0.0]), rtol=0, atol=0.2 * 2.0**-24)


@pytest.mark.parametrize("cut", [20, 37, 44, 80, 130])  # hold, mid-patience, ramp, after
@pytest.mark.parametrize("release", ["maturity", "fixed"])
def test_state_round_trip_equals_uninterrupted(cut, release):
    kw = {"release": release, "release_frac": 0.042 if release == "fixed" else None}
    scores = lambda s: 0.001 if s == 45 else 0.01  # noqa: E731
    ref_factors: list[float] = []
    ref = _run(_paper_rule(**kw), scores, stop=200, log=ref_factors)
    first = _paper_rule(**kw)
    got_factors: list[float] = []
    got = _run(first, scores, stop=cut, log=got_factors)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON
    second = _paper_rule(**kw)
    second.load_state_dict(state)
    got += _run(second, scores, start=cut + 1, stop=200, log=got_factors)
    assert got == ref and got_factors == ref_factors


def test_state_of_another_rule_is_refused():
    state = _paper_rule(name="a").state_dict()
    with pytest.raises(ValueError, match="'b'"):
        _paper_rule(name="b").load_state_dict(state)


# ------------------------------------------------------------------------------------------
# MultiplierScheduler on a stand-in optimizer (it only reads/writes optimizer.param_groups).


class _Groups:
    def __init__(self, groups):
        self.param_groups = groups


def _cfg(rules, steps=200, gbs=8, warmup=0.02, **optim) -> ExperimentConfig:
    return ExperimentConfig(
        optim=OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_frac=warmup, rules=rules, **optim),
        training=TrainingConfig(global_batch_size=gbs, micro_batch_size=4, train_steps=steps),
    )


def _groups():
    base = {"wd_mult": 1.0, "lr_mult": 1.0, "max_lr": 1e-3, "min_lr": 1e-4}
    return [
        dict(base, params=[]),
        dict(base, params=[], wd_mult=0.0),
        dict(base, params=[], lr_mult="mqk_rule:upper_qk", **{RULE_KEY: "upper_qk"}),
        dict(base, params=[], lr_mult="mqk_rule:fc", **{RULE_KEY: "fc"}),
    ]


def _rules():
    return [
        MultiplierRuleConfig(),
        MultiplierRuleConfig(
            name="fc", roles=["fc1"], multiplier=0.5, release="fixed", release_frac=0.05
        ),
    ]


def test_scheduler_applies_factors_and_counts_samples():
    cfg = _cfg(_rules())
    opt = _Groups(_groups())
    sched = build_scheduler(cfg, opt)
    assert sched.lr_warmup_steps == 4 * 8 and sched.lr_decay_steps == 200 * 8
    assert opt.param_groups[0]["lr"] == 0.0  # Megatron: warmup starts at init_lr 0
    for step in range(1, 21):
        sched.step(increment=8)
        base = sched.get_lr(opt.param_groups[0])
        assert opt.param_groups[1]["lr"] == base and opt.param_groups[1]["weight_decay"] == 0
        assert opt.param_groups[2]["lr"] == base * 0.25
        fc = 0.5 if step < 10 else min(1.0, 0.5 + 0.5 * (step - 10) / 2)
        # Exact, as for group 2: fc is dyadic (0.5 + 0.5 * t, t in {0, 0.5, 1}), computed
        # exactly by the ramp, and the group's get_lr is base (same max_lr/min_lr).
        assert opt.param_groups[3]["lr"] == base * fc
        assert sched.multipliers() == {"upper_qk": 0.25, "fc": fc}  # dyadic: exact
        events = sched.pop_events()
        assert [(e.rule, e.reason) for e in events] == ([("fc", "fixed")] if step == 10 else [])
    assert opt.param_groups[0]["max_lr"] == 1e-3  # override values are never edited
    assert sched.releases() == {"fc": {"step": 10, "frac": 0.05, "reason": "fixed"}}


def test_scheduler_global_multiplier_scales_lr_and_min_lr():
    sched = build_scheduler(_cfg([], lr_multiplier=0.5), _Groups([]))
    # min_lr = 0.1 * (1e-3 * 0.5): the halving is exact, the literals 0.1, 1e-3 and 5e-5 and the
    # product round once each: <= 4 U64.
    assert sched.max_lr == 5e-4 and sched.min_lr == pytest.approx(5e-5, rel=4 * 2.0**-53)


def test_scheduler_observe_evaluation_and_state_round_trip():
    cfg = _cfg(_rules(), steps=100, warmup=0.0)  # max_frac 12% = step 12, ramp 1 step
    opt = _Groups(_groups())
    sched = build_scheduler(cfg, opt)
    for _ in range(4):
        sched.step(increment=8)
    with pytest.raises(ValueError, match="scheduler is at step 4"):
        sched.observe_evaluation(3, 1.0)
    assert sched.observe_evaluation(4, 1.0) == []  # 4% in window: streak 1
    sched.step(increment=8)
    sched.observe_evaluation(5, 1.0)
    state = json.loads(json.dumps(sched.state_dict()))
    sched.step(increment=8)
    [ev] = sched.observe_evaluation(6, 1.0)
    assert (ev.rule, ev.reason, ev.step) == ("upper_qk", "maturity", 6)
    assert [e.rule for e in sched.pop_events()] == ["fc", "upper_qk"]  # fc fixed at 5%
    after = [g["lr"] for g in opt.param_groups]
    # A fresh scheduler restored from step 5 reproduces step 6 exactly.
    opt2 = _Groups(_groups())
    sched2 = build_scheduler(cfg, opt2)
    sched2.step(increment=8)  # a scheduler that already stepped must still load exactly
    sched2.load_state_dict(state)
    assert sched2.num_steps == 5 * 8 and sched2.pop_events() == []
    sched2.step(increment=8)
    assert [e.step for e in sched2.observe_evaluation(6, 1.0)] == [6]
    assert [g["lr"] for g in opt2.param_groups] == after


def test_scheduler_refuses_mismatched_rules_and_groups():
    with pytest.raises(ValueError, match="no optimizer parameter group"):
        build_scheduler(_cfg(_rules()), _Groups(_groups()[:3]))
    with pytest.raises(ValueError, match="unknown rules"):
        build_scheduler(_cfg(_rules()[:1]), _Groups(_groups()))
    state = build_scheduler(_cfg(_rules()), _Groups(_groups())).state_dict()
    other = build_scheduler(_cfg(_rules()[:1]), _Groups(_groups()[:3]))
    with pytest.raises(ValueError, match="multiplier rules"):
        other.load_state_dict(state)


def test_scheduler_entropy_floor_weight():
    cfg = _cfg([], steps=100, entropy_floor=EntropyFloorConfig(enabled=True, lam=0.1))
    sched = build_scheduler(cfg, _Groups([]))
    assert sched.entropy_floor_weight() == 0.1  # lam * 1.0 (hold factor): exact
    for _step in range(1, 13):
        sched.step(increment=8)
    assert [(e.rule, e.reason) for e in sched.pop_events()] == [("entropy_floor", "forced")]
    sched.step(increment=8)
    assert sched.entropy_floor_weight() == 0.0
    assert sched.multipliers() == {}
