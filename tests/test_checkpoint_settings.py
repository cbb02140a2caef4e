"""A checkpoint of another recipe is named, not loaded (diagnose, export, resume, warm start), and
``training.init_checkpoint`` starts a run from another run's weights only."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megatron_qk.cli import main as cli_main
from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import load_config
from megatron_qk.training.checkpoint_settings import CheckpointMismatchError
from megatron_qk.training.entry import train_from_config


def tiny(run_dir: Path, *overrides: str):
    return load_config(
        "tiny",
        [
            f"training.output_dir={run_dir}",
            "training.train_steps=2",
            "training.eval_interval=2",
            "diagnostics.enabled=false",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *overrides,
        ],
    )


def evals(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if r["kind"] == "eval"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step tiny run (hidden_size 64) with its checkpoint iter_0000002."""
    run_dir = tmp_path_factory.mktemp("settings") / "a"
    train_from_config(tiny(run_dir))
    return run_dir


def _relabelled(trained: Path, tmp_path: Path, hidden_size: int = 128) -> Path:
    """A copy of the run whose config.yaml says another hidden_size than its checkpoint has."""
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    data = yaml.safe_load((other / "config.yaml").read_text())
    data["model"]["hidden_size"] = hidden_size
    (other / "config.yaml").write_text(yaml.safe_dump(data))
    return other


def test_diagnose_and_export_name_the_first_differing_setting(trained, tmp_path, capsys):
    other = _relabelled(trained, tmp_path)
    expected = "has hidden_size 64, this run's config.yaml"
    with pytest.raises(SystemExit) as exc:
        cli_main(["diagnose", "--checkpoint", str(other), "--num-sequences", "1"])
    message = str(exc.value.code)
    assert "checkpoint iter_0000002" in message and expected in message, message
    assert "says 128" in message
    out = tmp_path / "exported"
    assert (
        cli_main(["export", "--checkpoint", str(other), "--format", "megatron", "--out", str(out)])
        == 1
    )
    err = capsys.readouterr().err
    assert "checkpoint iter_0000002" in err and expected in err and "says 128" in err, err
    assert "Traceback" not in err and not out.exists()


def test_a_checkpoint_without_recorded_settings_gets_the_shape_error_explained(trained, tmp_path):
    from megatron_qk.training.restore import load_checkpoint_for_analysis

    other = _relabelled(trained, tmp_path)
    state_file = other / "checkpoints" / "iter_0000002" / "train_state.pt"
    state = torch.load(state_file, weights_only=False)
    del state["model_settings"]  # as written before the settings were recorded
    torch.save(state, state_file)
    with pytest.raises(CheckpointMismatchError, match="iter_0000002 .* does not fit the model"):
        load_checkpoint_for_analysis(other)


def test_resume_from_a_checkpoint_of_another_recipe_names_the_setting(trained, tmp_path):
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    shutil.copytree(trained / "checkpoints", run_dir / "checkpoints")
    with pytest.raises(
        CheckpointMismatchError, match="has hidden_size 64, this run's recipe says 128"
    ):
        train_from_config(tiny(run_dir, "model.hidden_size=128"))


def test_init_checkpoint_loads_the_weights_only(trained, tmp_path):
    run_dir = tmp_path / "warm"
    summary = train_from_config(tiny(run_dir, f"training.init_checkpoint={trained}"))
    warm, source = evals(run_dir), evals(trained)
    # Step 0 of the warm start evaluates the loaded weights: the source's final model.
    assert warm[0] == source[2] and warm[0] != source[0]
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    source_train = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    source_lr = [r["lr"] for r in source_train if r["kind"] == "train"]
    # Step 0, the schedule from its warm-up: the same lrs as the source's own first steps.
    assert [r["step"] for r in train] == [1, 2] and [r["lr"] for r in train] == source_lr
    assert summary["steps"] == 2
    assert (run_dir / "checkpoints" / "iter_0000002").is_dir()


def test_init_checkpoint_of_another_recipe_or_a_missing_one_is_refused(trained, tmp_path):
    with pytest.raises(
        CheckpointMismatchError,
        match=r"has hidden_size 64, this run's recipe \(training.init_checkpoint\) says 128",
    ):
        train_from_config(
            tiny(tmp_path / "b", f"training.init_checkpoint={trained}", "model.hidden_size=128")
        )
    with pytest.raises(ConfigError, match="training.init_checkpoint: checkpoint .* does not exist"):
        train_from_config(tiny(tmp_path / "c", f"training.init_checkpoint={tmp_path / 'none'}"))


def test_runs_started_before_init_checkpoint_existed_still_resume(tmp_path):
    """The identity hash leaves the new key out while it is null, so the hash recorded by a run
    started before the key existed still matches."""
    import copy

    from megatron_qk.config.identity import ADDED_AFTER_RUNS_EXISTED, unset_added_keys
    from megatron_qk.config.loader import config_to_dict
    from megatron_qk.training.run_dir import RESUME_FREE_KEYS
    from megatron_qk.training.run_identity import claim_run_dir, read_identity, recipe_hash

    cfg = tiny(tmp_path / "r")
    (tmp_path / "r").mkdir()
    claim_run_dir(tmp_path / "r", cfg)
    before = copy.deepcopy(config_to_dict(cfg))
    removed = unset_added_keys(before)
    for added in ADDED_AFTER_RUNS_EXISTED:  # each added key or section is left at its default
        assert any(k == added or k.startswith(added + ".") for k in removed), added
    for key in removed:  # the recipe as the older code saw it
        *path, name = key.split(".")
        section = before
        for part in path:
            section = section[part]
        del section[name]
    old_hash = recipe_hash(before, RESUME_FREE_KEYS | {"training.output_dir"})
    assert read_identity(tmp_path / "r")["recipe_sha256"] == old_hash
    warm = tiny(tmp_path / "r", "training.init_checkpoint=somewhere")
    with pytest.raises(ConfigError, match="another recipe"):
        claim_run_dir(tmp_path / "r", warm)  # once set, the key is part of the identity


def test_diagnose_rebuilds_the_initialisation_on_the_device_that_drew_it(trained, caplog):
    """A checkpoint records where its run's initial weights were drawn; `diagnose` rebuilds the
    initialisation there for the displacement, and leaves the displacement out (with a warning)
    when that device is a GPU and none is here, instead of measuring from another model."""
    from megatron_qk.analysis.diagnose import initial_model_device
    from megatron_qk.training.restore import load_checkpoint_for_analysis

    loaded = load_checkpoint_for_analysis(trained, device="cpu")
    assert loaded.model.init_device == "cpu"  # recorded by the CPU run that wrote it
    assert initial_model_device(loaded) == torch.device("cpu")
    loaded.model.init_device = "cuda"  # as a checkpoint of a GPU run reads
    if not torch.cuda.is_available():
        assert initial_model_device(loaded) is None
        assert "displacement is not measured" in caplog.text
    else:
        assert initial_model_device(loaded) == torch.device("cuda")
