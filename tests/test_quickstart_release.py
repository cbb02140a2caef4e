"""The quickstart's intervention rule releases by maturity on a real quickstart run's scores.

The fixture holds the ``diag`` lines (step, lower_copy, lower_copy_uniform) of a real 200-step
quickstart intervention arm trained with the ``quickstart-intervention`` preset's rule, and the
``release`` line that run logged (see its ``provenance``). A full quickstart takes minutes, so the
suite replays the preset's rule, loaded from the preset file itself, on those scores: if the preset
drifts (e.g. back to the paper's 12% window, which forces the release at step 24 at this scale),
the release stops being a maturity event and this test fails.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from megatron_qk.analysis.replay import ReleaseSettings, replay_release
from megatron_qk.config.loader import load_config

FIXTURE = Path(__file__).parent / "data" / "quickstart_intervention_scores.json"


def _preset_rule():
    cfg = load_config("quickstart-intervention")
    (rule,) = cfg.optim.rules
    return cfg, rule


def test_quickstart_rule_needs_the_score_to_mature():
    _, rule = _preset_rule()
    data = json.loads(FIXTURE.read_text())
    step0, copy0, uniform0 = data["scores"][0]
    # Below the threshold at initialisation: the release is not met from step 0 on.
    assert step0 == 0 and copy0 / uniform0 < rule.threshold_ratio
    assert rule.threshold_mode == "over_uniform"


def test_quickstart_rule_releases_by_maturity_where_the_run_did():
    cfg, rule = _preset_rule()
    data = json.loads(FIXTURE.read_text())
    assert cfg.planned_steps() == data["planned_steps"]
    settings = ReleaseSettings(**{f.name: getattr(rule, f.name) for f in fields(ReleaseSettings)})
    event = replay_release(data["scores"], data["planned_steps"], settings)
    assert event is not None and event.reason == "maturity"
    logged = data["logged_release"]
    assert (event.step, event.reason) == (logged["step"], logged["reason"])
    # Released inside the window, after the score crossed (not at the window's end).
    assert event.step < rule.max_frac * data["planned_steps"]
