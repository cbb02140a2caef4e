"""Runs shared between tables by symbolic link (as ``run_table.sh`` links them): the one run
finder follows links, refuses cycles and lists a run once; compare, readout, replay-release and
plot pair arms within the table directory given, under the arm each link names; a table
directory gives the same tables as its run directories given one by one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_qk.cli import main
from megatron_qk.config.loader import dump_config, load_config
from megatron_qk.rundir.finder import RunFinderError, find_runs, run_label

STEPS = 10
# Final losses per (arm, seed): the intervention and the floor beat the control.
FINAL = {"control": 3.0, "intervention": 2.8, "entropy_floor": 2.9}


def make_run(root: Path, arm: str, seed: int, *, diag_steps=range(0, STEPS + 1, 2)) -> Path:
    """A finished run directory as training writes it (config, metrics with diag lines, summary)."""
    run_dir = root / f"{arm}-s{seed}"
    run_dir.mkdir(parents=True)
    cfg = load_config(
        "tiny",
        [f"arm={arm}", f"name=recipe-of-{root.name}", f"training.seed={seed}",
         f"training.output_dir={run_dir}", f"training.train_steps={STEPS}",
         "training.eval_interval=2"],
    )  # fmt: skip
    (run_dir / "config.yaml").write_text(dump_config(cfg, extra={"git_sha": "x"}))
    final = FINAL[arm] + 0.01 * seed
    lines = []
    for step in diag_steps:
        loss = final + (STEPS - step) * 0.1
        pos = {"step": step, "tokens": step * 512, "frac": step / STEPS}
        lines.append({"kind": "eval", **pos, "val_loss": loss, "val_ppl": math.exp(loss)})
        lines.append(
            {"kind": "diag", **pos, "lower_copy": 0.001 * step, "lower_copy_uniform": 0.01,
             "upper_entropy": 1.0 - 0.01 * step - (0.2 if arm == "control" else 0.0)}
        )  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"name": cfg.name, "arm": arm, "seed": seed, "steps": STEPS, "tokens": STEPS * 512,
               "planned_steps": STEPS, "finished": True, "final_val_loss": final,
               "final_val_ppl": math.exp(final), "release": {}}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def link(target: Path, at: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target.resolve())
    return at


@pytest.fixture()
def tables(tmp_path) -> Path:
    """Table 1 trained; Table 6 links its control; Table 9 links both under other labels."""
    runs = tmp_path / "runs"
    for seed in (1, 2):
        for arm in ("control", "intervention"):
            make_run(runs / "table1", arm, seed)
        make_run(runs / "table6", "entropy_floor", seed)
        link(runs / "table1" / f"control-s{seed}", runs / "table6" / f"control-s{seed}")
        link(runs / "table1" / f"control-s{seed}", runs / "table9" / f"control-s{seed}")
        link(runs / "table1" / f"intervention-s{seed}", runs / "table9" / f"adaptive-s{seed}")
    return runs


def _compare(paths: list[Path], tmp_path: Path, capsys, *extra: str) -> tuple[int, str, dict]:
    out = tmp_path / "cmp.json"
    rc = main(["compare", *map(str, paths), "--json", str(out), *extra])
    text = capsys.readouterr()
    return rc, text.out + text.err, (json.loads(out.read_text()) if rc == 0 else {})


def test_finder_follows_links_and_lists_each_run_once(tables):
    found = find_runs([tables / "table6", tables / "table6" / "control-s1"])
    assert [r.path.name for r in found] == [
        "control-s1", "control-s2", "entropy_floor-s1", "entropy_floor-s2"
    ]  # fmt: skip
    assert found[0].linked and found[0].resolved == (tables / "table1" / "control-s1").resolve()
    assert found[0].group == str(tables / "table6")
    # A run reached twice in one directory is listed once; linked into two tables, in each.
    twice = find_runs([tables / "table1", tables / "table1" / "control-s1", tables / "table1"])
    assert len(twice) == 4
    both = find_runs([tables / "table1", tables / "table6"])
    assert len(both) == 8 and len({r.resolved for r in both}) == 6
    # Under another arm's name in the same table it stands for that arm too.
    link(tables / "table1" / "control-s1", tables / "table1" / "twin-s1")
    assert len(find_runs([tables / "table1"])) == 5
    assert run_label(tables / "table9" / "adaptive-s1", "intervention", 1) == "adaptive"
    assert run_label(tables / "table9" / "adaptive-s1", "intervention", 2) == "intervention"
    assert run_label(tables / "table1" / "intervention-s1", "intervention", 1) == "intervention"


def test_finder_refuses_a_link_cycle(tables):
    (tables / "table6" / "loop").symlink_to(tables.resolve())
    with pytest.raises(RunFinderError, match="link cycle"):
        find_runs([tables / "table6"])


def test_compare_of_a_table_with_linked_runs_equals_the_runs_given(tables, tmp_path, capsys):
    rc, text, by_dir = _compare([tables / "table6"], tmp_path, capsys)
    assert rc == 0, text
    assert by_dir["seeds"] == [1, 2] and sorted(by_dir["arms"]) == ["control", "entropy_floor"]
    explicit = sorted((tables / "table6").iterdir())
    rc, _, by_runs = _compare(explicit, tmp_path, capsys)
    assert rc == 0 and by_runs == by_dir
    # Table 9: Table 1's intervention stands for the adaptive arm where it is linked.
    rc, text, t9 = _compare([tables / "table9"], tmp_path, capsys, "--control", "control")
    assert rc == 0, text
    assert sorted(t9["arms"]) == ["adaptive", "control"]
    assert t9["arms"]["adaptive"]["runs"][0] == str(tables / "table9" / "adaptive-s1")


def test_compare_fails_naming_why_when_the_table_cannot_be_made(tables, tmp_path, capsys):
    (tables / "table6" / "control-s2").unlink()
    rc, text, _ = _compare([tables / "table6"], tmp_path, capsys)
    assert rc == 2 and "unpaired seed" in text


def test_readout_pairs_within_the_table_directory(tables, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["readout", str(tables / "table6"), "--at", "0.4", "--json", str(out)]) == 0
    by_dir = json.loads(out.read_text())
    pairs = {p["arm"]: p for p in by_dir["pairs"]}
    # The linked control is this table's control: the floor gets its PPL reduction row.
    assert set(pairs) == {"control", "entropy_floor"}
    assert {p["name"] for p in by_dir["pairs"]} == {str(tables / "table6")}
    want = math.exp(3.01) - math.exp(2.91), math.exp(3.02) - math.exp(2.92)
    assert pairs["entropy_floor"]["ppl_reduction"] == pytest.approx(sum(want) / 2, rel=1e-12)
    explicit = [str(p) for p in sorted((tables / "table6").iterdir())]
    assert main(["readout", *explicit, "--at", "0.4", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == by_dir
    capsys.readouterr()


def test_readout_warns_of_a_far_evaluation_and_pairs_at_every_at(tmp_path, capsys):
    root = tmp_path / "t"
    make_run(root, "control", 1, diag_steps=[0, 8, 9, 10])
    make_run(root, "intervention", 1, diag_steps=[0, 8, 9, 10])
    out = tmp_path / "r.json"
    assert main(["readout", str(root), "--at", "0.5", "--at", "0.9", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    data = json.loads(out.read_text())
    # 50% is step 5: the nearest evaluation is step 8, 3 steps away, the interval is 1 step.
    assert len(data["warnings"]) == 2 and "--at 50% reads the evaluation at step 8" in err
    assert "more than one evaluation interval (1 steps)" in err and "--at 90%" not in err
    assert sorted({(p["arm"], p["at"]) for p in data["pairs"]}) == [
        ("control", 0.5), ("control", 0.9), ("intervention", 0.5), ("intervention", 0.9)
    ]  # fmt: skip


def test_replay_and_plot_find_linked_runs(tables, tmp_path, capsys):
    assert main(["replay-release", str(tables / "table9"), "--arm", "adaptive", "--json"]) in (0, 1)
    data = json.loads(capsys.readouterr().out)
    assert [Path(r["metrics"]).name for r in data["runs"]] == ["adaptive-s1", "adaptive-s2"]
    assert main(["plot", str(tables / "table6"), "--out", str(tmp_path / "png")]) == 0
    assert "figure3" in capsys.readouterr().out
