"""A missing optional package names the extra that installs it (issue 26, item 4).

Each test hides the package (``sys.modules[name] = None`` makes its import fail as if it were not
installed) and checks the message and, through the console script, that no traceback comes out.
"""

from __future__ import annotations

import sys

import pytest

from megatron_qk.cli import main
from megatron_qk.config.extras import EXTRA_OF, MissingExtraError, missing_extra, require
from megatron_qk.config.loader import dump_config, load_config
from megatron_qk.rundir.layout import CONFIG_FILE, TRAIN_STATE_FILE


def _hide(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_names_the_extra(monkeypatch):
    _hide(monkeypatch, "safetensors", "safetensors.torch")
    with pytest.raises(MissingExtraError, match=r"pip install 'megatron-qk\[export\]'"):
        require("safetensors.torch", "export --format hf")
    assert require("json", "anything").dumps(1) == "1"  # an installed module comes back


def test_every_extra_named_is_one_setup_py_declares():
    import ast
    from pathlib import Path

    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text(encoding="utf-8")
    tree = ast.parse(setup)
    (extras,) = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and node.targets[0].id == "EXTRAS_REQUIRE"
    ]
    for module, extra in EXTRA_OF.items():
        assert extra in extras, (module, extra)


def test_missing_extra_checks_without_importing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    error = missing_extra("wandb", "logging.wandb: online")
    assert isinstance(error, MissingExtraError)
    assert str(error) == (
        "logging.wandb: online needs the optional package wandb: pip install 'megatron-qk[wandb]'"
    )
    assert missing_extra("json", "x") is None


def test_wandb_sink_and_preflight_name_the_wandb_extra(tmp_path, monkeypatch):
    import importlib.util

    from megatron_qk.training.preflight import PreflightError, preflight
    from megatron_qk.training.sinks import MetricsSinks

    _hide(monkeypatch, "wandb")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"megatron-qk\[wandb\]"):
        MetricsSinks(tmp_path, True, False, "offline", "p", "run", {})
    cfg = load_config("tiny", ["logging.wandb=offline", f"training.output_dir={tmp_path / 'r'}"])
    with pytest.raises(PreflightError) as exc:
        preflight(cfg, world_size=1, check_device=False)
    (problem,) = exc.value.problems
    assert problem.path == "logging.wandb"
    assert "pip install 'megatron-qk[wandb]'" in problem.message


def _fake_run(tmp_path):
    """A run directory whose checkpoint is never read: the export stops before loading it."""
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_0000001").mkdir(parents=True)
    (run / "checkpoints" / "iter_0000001" / TRAIN_STATE_FILE).write_bytes(b"")
    (run / CONFIG_FILE).write_text(dump_config(load_config("tiny")), encoding="utf-8")
    return run


def test_export_hf_without_the_export_extra_says_so(tmp_path, monkeypatch, capsys):
    _hide(monkeypatch, "safetensors", "safetensors.torch")
    ckpt = _fake_run(tmp_path) / "checkpoints" / "iter_0000001"
    argv = ["export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        "megatron-qk export: error: export --format hf needs the optional package safetensors: "
        "pip install 'megatron-qk[export]'\n"
    )
    assert not (tmp_path / "o").exists()


def test_eval_without_the_eval_extra_says_so(tmp_path, monkeypatch, capsys):
    _hide(monkeypatch, "lm_eval", "lm_eval.tasks", "lm_eval.tasks._index")
    run = _fake_run(tmp_path)
    assert main(["eval", "--checkpoint", str(run), "--tasks", "piqa"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'megatron-qk[eval]'" in err and "Traceback" not in err
