"""The issue's reproduction: ``megatron-qk diagnose --checkpoint COPY`` on planted run copies."""

from __future__ import annotations

import shutil

import pytest
import torch
from security_payloads import TouchMarker, payload_bytes

from megatron_qk import cli
from megatron_qk.config.loader import load_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from megatron_qk.training.entry import train_from_config

    root = tmp_path_factory.mktemp("quick") / "run"
    cfg = load_config(
        "tiny",
        [
            f"training.output_dir={root}",
            "training.train_steps=2",
            "training.eval_interval=2",
            "training.save_interval=2",
            "logging.progress_bar=false",
        ],
    )
    train_from_config(cfg)
    return root


def _plant_state(ckpt, marker):
    torch.save({"step": TouchMarker(marker)}, ckpt / "train_state.pt")


def _plant_metadata(ckpt, marker):
    (ckpt / ".metadata").write_bytes(payload_bytes(marker))


@pytest.mark.parametrize("plant", [_plant_state, _plant_metadata], ids=["train_state", "metadata"])
def test_diagnose_on_a_planted_copy_refuses_and_runs_nothing(run_dir, tmp_path, plant):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    marker = tmp_path / "pwned"
    plant(copy / "checkpoints" / "iter_0000002", marker)
    with pytest.raises(SystemExit, match="megatron-qk diagnose: refusing .*iter_0000002"):
        cli.main(["diagnose", "--checkpoint", str(copy), "--num-sequences", "2"])
    assert not marker.exists()
