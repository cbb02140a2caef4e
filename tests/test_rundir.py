"""The torch-free run-directory package: atomic writes, layout and the ``RunLog`` loader."""

from __future__ import annotations

import json
import os

import pytest

from megatron_qk.rundir.atomic import atomic_open, write_bytes_atomic, write_json_atomic


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
