"""Preprocessing resume treats its work directory as data: no planted paths, links or temp names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from data_fixtures import pydoc_docs, run_preprocess, text_records, write_jsonl

from megatron_qk.data.workdir import OutputPaths
from megatron_qk.rundir.atomic import write_json_atomic

OPTIONS = {"shard_size": 5, "chunk_bytes": 2000, "valid_fraction": 0.25}


@pytest.fixture
def small_input(tmp_path):
    return [write_jsonl(tmp_path / "in.jsonl", text_records(pydoc_docs(40)))]


def _interrupt(event: str, n: int = 1):
    seen = []

    def hook(kind, manifest):
        if kind == event:
            seen.append(kind)
            if len(seen) == n:
                raise KeyboardInterrupt

    return hook


def test_finalisation_ignores_paths_planted_in_the_manifest(tmp_path, small_input):
    prefix = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(prefix, small_input, on_event=_interrupt("finalizing"), **OPTIONS)
    work = OutputPaths(str(prefix)).work_dir
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    stolen_from = tmp_path / "secret.txt"
    stolen_from.write_text("private")
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["removals"].append(str(victim))
    manifest["renames"].insert(0, [str(stolen_from), str(tmp_path / "exposed.txt")])
    (work / "manifest.json").write_text(json.dumps(manifest))
    summary = run_preprocess(prefix, small_input, **OPTIONS)
    assert summary["documents"] > 0
    assert victim.read_text() == "keep me" and stolen_from.read_text() == "private"
    assert not (tmp_path / "exposed.txt").exists()
    assert Path(f"{prefix}_text_document.idx").exists()


def test_resume_refuses_a_planted_link_instead_of_truncating_its_target(tmp_path, small_input):
    prefix = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(prefix, small_input, on_event=_interrupt("commit", 3), **OPTIONS)
    work = OutputPaths(str(prefix)).work_dir
    assert (work.stat().st_mode & 0o077) == 0  # created private to the user
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"x" * 10**6)  # larger than any committed size: truncation would show
    (work / "train.bin").unlink()
    (work / "train.bin").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        run_preprocess(prefix, small_input, **OPTIONS)
    assert victim.read_bytes() == b"x" * 10**6


def test_atomic_json_never_writes_through_a_planted_temp_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "manifest.json"
    (tmp_path / "manifest.json.tmp").symlink_to(victim)  # the old, predictable temp name
    write_json_atomic(target, {"a": 1})
    assert victim.read_text() == "keep me"
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == ["manifest.json.tmp"]
    assert os.path.islink(tmp_path / "manifest.json.tmp")
