"""Recipe errors that name the fix (issue 26, item 11) and the resolved recipe (item 10).

"Did you mean" for an unknown key (same section, another section, another trainer's name), the
YAML boolean reading of ``yes``, the ``--set`` that gave an unknown section, file:line on the
preflight's problems (the layer-range error), and ``train --print-config``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env

from megatron_qk.cli import main
from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import config_to_dict, load_config
from megatron_qk.config.suggest import ALIASES, all_keys


def _error(source, *overrides: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(source, list(overrides))
    return str(exc.value)


@pytest.mark.parametrize(
    "override, meant",
    [
        ("training.learning_rate=1e-3", "optim.lr"),  # another trainer's name, another section
        ("lr=1e-3", "optim.lr"),  # at the top level
        ("training.weight_decay=0.1", "optim.weight_decay"),  # the same name in another section
        ("model.num_layer=3", "model.num_layers"),  # a misspelling in the same section
        ("optim.rules=[{name: a, multipler: 2}]", "optim.rules[0].multiplier"),  # in a list item
    ],
)
def test_unknown_key_suggests_the_key_meant(override, meant):
    message = _error("tiny", override)
    assert f"did you mean {meant}?" in message, message
    assert f"(--set {override})" in message


def test_unknown_key_in_a_file_suggests_and_names_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: tiny\ntraining:\n  seed: 3\n  learning_rate: 0.1\n")
    message = _error(recipe)
    assert "did you mean optim.lr?" in message and f"({recipe}:4)" in message


def test_every_alias_names_a_real_key():
    keys = set(all_keys())
    assert {alias: key for alias, key in ALIASES.items() if key not in keys} == {}


def test_yaml_boolean_is_explained():
    message = _error("tiny", "logging.wandb=yes")
    assert "got True" in message and "YAML reads an unquoted yes/no/on/off/true/false" in message
    assert "(--set logging.wandb=yes)" in message
    assert load_config("tiny", ["logging.wandb='offline'"]).logging.wandb == "offline"


def test_an_unknown_section_given_by_set_names_its_set():
    message = _error("tiny", "trainer.steps=3")
    assert message.startswith("trainer: unknown key")
    assert message.endswith("(--set trainer.steps=3)")


def test_a_set_list_is_located_at_its_set_not_at_the_file_it_replaced(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: tiny\noptim:\n  rules:\n    - name: a\n      multiplier: 0.5\n")
    message = _error(recipe, "optim.rules=[{name: a, multiplier: -1}]")
    assert message.endswith("(--set optim.rules=[{name: a, multiplier: -1}])"), message


def test_preflight_layer_range_error_names_file_and_line(tmp_path):
    from megatron_qk.training.preflight import PreflightError, preflight

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"base: tiny\ntraining:\n  output_dir: {tmp_path / 'run'}\n"
        "optim:\n  rules:\n    - name: upper_qk\n      layers: '3-9'\n"
    )
    with pytest.raises(PreflightError) as exc:
        preflight(load_config(recipe), world_size=1, check_device=False)
    (problem,) = exc.value.problems
    assert problem.path == "optim.rules[0].layers"
    assert str(problem).endswith(f"is outside layers 1..4 ({recipe}:7)"), str(problem)
    # Given by --set, the same problem names the --set.
    rule = "optim.rules=[{name: upper_qk, layers: '3-9'}]"
    with pytest.raises(PreflightError) as exc:
        preflight(load_config(recipe, [rule]), world_size=1, check_device=False)
    assert str(exc.value).endswith(f"(--set {rule})")


# -- item 10: the resolved recipe ---------------------------------------------------------------
PRINT_CONFIG = (
    "import sys\n"
    "from megatron_qk.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "heavy = sorted(m for m in sys.modules\n"
    "               if m == 'torch' or m.startswith(('torch.', 'megatron.')))\n"
    "assert not heavy, heavy[:5]\n"
    "sys.exit(rc)\n"
)


def test_print_config_shows_every_resolved_key_without_torch(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: gpt-270m\narm: intervention\noptim:\n  rules: [{name: upper_qk}]\n")
    out_dir = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-c", PRINT_CONFIG, "train", str(recipe), "--print-config"]
        + ["--set", f"training.output_dir={out_dir}"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    cfg = load_config(recipe, [f"training.output_dir={out_dir}"])
    assert shown == config_to_dict(cfg)  # every key, the defaults included
    assert shown["arm"] == "intervention" and shown["training"]["output_dir"] == out_dir
    assert shown["optim"]["rules"][0]["threshold"] == 0.005  # a default the recipe left out
    assert shown["data"]["train_prefixes"] == ["data/fineweb-edu-10BT_text_document"]
    assert not (tmp_path / "run").exists()  # nothing trained, nothing created


def test_dry_run_with_print_config_reports_the_resolved_recipe(tmp_path, capsys):
    out_dir = str(tmp_path / "run")
    rc = main(
        ["train", "tiny", "--dry-run", "--print-config", "--set", f"training.output_dir={out_dir}"]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == config_to_dict(
        load_config("tiny", [f"training.output_dir={out_dir}"])
    )
    assert report["parameters"]["total"] == report["expected_parameters"]


# -- item 8: the README's dry run of a paper preset on a fresh clone ------------------------------
def test_dry_run_of_a_preset_without_its_data_suggests_no_data_check(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no data/ directory
    assert main(["train", "gpt-270m", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "data/fineweb-edu-10BT_text_document.idx does not exist" in err
    assert "megatron-qk preprocess" in err and "add --no-data-check" in err
    # The README's command, as printed there.
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    command = "megatron-qk train gpt-270m --dry-run --no-data-check"
    assert f"`{command}`" in " ".join(readme.split())
    assert main(command.split()[1:]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["total"] == report["expected_parameters"]
    assert list(tmp_path.iterdir()) == []  # a dry run creates nothing
