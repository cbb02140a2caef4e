"""A training run resumes only a run directory its user created, for the same recipe."""

from __future__ import annotations

import json
import os

import pytest

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import load_config
from megatron_qk.rundir.layout import IDENTITY_FILE
from megatron_qk.training.run_identity import check_run_identity, recipe_hash, write_identity


def _tiny(run_dir, *extra):
    return load_config(
        "tiny",
        [
            f"training.output_dir={run_dir}",
            "training.train_steps=2",
            "training.eval_interval=2",
            "training.save_interval=1",
            "logging.progress_bar=false",
            *extra,
        ],
    )


def test_resume_of_a_run_directory_recorded_for_another_user_is_refused(tmp_path):
    from megatron_qk.training.entry import train_from_config

    run_dir = tmp_path / "run"
    train_from_config(_tiny(run_dir, "training.exit_after_steps=1"))  # a checkpoint at step 1
    identity = json.loads((run_dir / IDENTITY_FILE).read_text())
    assert identity["owner_uid"] == os.getuid() and len(identity["recipe_sha256"]) == 64
    assert (run_dir.stat().st_mode & 0o077) == 0
    # The directory now claims another owner (as one prepared by a colleague would).
    identity["owner_uid"] = os.getuid() + 1
    identity["owner"] = "colleague"
    (run_dir / IDENTITY_FILE).write_text(json.dumps(identity))
    with pytest.raises(ConfigError, match="records owner 'colleague'.*refusing to resume"):
        train_from_config(_tiny(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000001"  # untouched


def test_foreign_files_and_other_recipes_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "iter_0000001").mkdir(parents=True)
    digest = recipe_hash({"model": {"num_layers": 2}, "training": {"log_interval": 1}})
    write_identity(run_dir, digest)
    check_run_identity(run_dir, digest)  # one's own run, same recipe
    with pytest.raises(ConfigError, match="not created by you"):
        check_run_identity(run_dir, digest, uid=os.getuid() + 1)  # as seen by another user
    other = recipe_hash({"model": {"num_layers": 4}, "training": {"log_interval": 1}})
    with pytest.raises(ConfigError, match="another recipe"):
        check_run_identity(run_dir, other)


def test_recipe_hash_ignores_only_the_free_keys():
    a = {"optim": {"lr": 1e-3}, "training": {"log_interval": 1}}
    b = {"optim": {"lr": 1e-3}, "training": {"log_interval": 50}}
    c = {"optim": {"lr": 2e-3}, "training": {"log_interval": 1}}
    free = {"training.log_interval"}
    assert recipe_hash(a, free) == recipe_hash(b, free)
    assert recipe_hash(a, free) != recipe_hash(c, free)
    assert recipe_hash(a) != recipe_hash(b)


def test_run_directory_without_checkpoints_or_record_passes(tmp_path):
    check_run_identity(tmp_path / "missing", recipe_hash({}))
    (tmp_path / "empty").mkdir()
    check_run_identity(tmp_path / "empty", recipe_hash({}), uid=os.getuid() + 1)
