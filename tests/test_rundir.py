"""The torch-free run-directory package: atomic writes, layout and the ``RunLog`` loader."""

from __future__ import annotations

import json
import os

import pytest

from megatron_qk.rundir.atomic import atomic_open, write_bytes_atomic, write_json_atomic
from megatron_qk.rundir.layout import (
    checkpoint_name,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
)


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    write_json_atomic(target, {"b": 1, "a": 2}, sort_keys=True)
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    write_bytes_atomic(tmp_path / "x.bin", b"\x00\x01", mode=0o600)
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "x.bin"]


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_atomic_write_uses_the_umask_like_open(tmp_path):
    write_json_atomic(tmp_path / "a.json", [1])
    (tmp_path / "b.json").write_text(json.dumps([1]))
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "b.json").stat().st_mode


def _checkpoint(root, step):
    path = root / checkpoint_name(step)
    path.mkdir(parents=True)
    (path / "train_state.pt").write_bytes(b"")
    return path


def test_checkpoint_names_parse_back_and_list_only_complete_ones(tmp_path):
    assert checkpoint_name(42) == "iter_0000042"
    assert checkpoint_step("iter_0000042") == 42 and checkpoint_step("iter_42") is None
    assert checkpoint_step("iter_0000042.tmp") is None
    root = tmp_path / "run" / "checkpoints"
    old, new = _checkpoint(root, 5), _checkpoint(root, 10)
    (root / "iter_0000015").mkdir()  # no train_state.pt: incomplete
    (root / "iter_0000020.tmp").mkdir()
    (root / "iter_0000020.tmp" / "train_state.pt").write_bytes(b"")
    assert list_checkpoints(root) == [old, new]
    assert latest_checkpoint(root) is None
    (root / "latest").write_text("iter_0000010\n")
    assert latest_checkpoint(root) == new


def test_resolve_checkpoint_accepts_run_dir_checkpoints_dir_and_one_checkpoint(tmp_path):
    run = tmp_path / "run"
    first, last = _checkpoint(run / "checkpoints", 5), _checkpoint(run / "checkpoints", 10)
    (run / "checkpoints" / "latest").write_text("iter_0000010\n")
    (run / "config.yaml").write_text("{}\n")
    assert resolve_checkpoint(run) == (last, run)
    assert resolve_checkpoint(run / "checkpoints") == (last, run)
    assert resolve_checkpoint(first) == (first, run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
