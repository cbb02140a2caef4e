"""``preprocess --shard I/N`` + ``merge-datasets`` equal one job byte for byte; bad sets refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import (
    fineweb_rows,
    pydoc_docs,
    run_preprocess,
    same_files,
    text_records,
    write_jsonl,
    write_parquet,
)

from megatron_qk.data.merge import merge_datasets
from megatron_qk.data.readers import PreprocessError

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = ("text_document", "valid_text_document")
OPTIONS = {"valid_fraction": 0.2, "chunk_bytes": 4000, "shard_size": 9}


def _inputs(d: Path, kind: str) -> list[Path]:
    docs = pydoc_docs()
    pieces = [docs[k * 20 : k * 20 + 20] for k in range(5)]  # five files: shards of 1-2 files
    if kind == "parquet":
        return [write_parquet(d / f"{k}.parquet", fineweb_rows(p)) for k, p in enumerate(pieces)]
    records = [text_records(p, start_id=20 * k) for k, p in enumerate(pieces)]
    records[1].insert(3, {"text": ""})  # a skipped record, counted in the merged summary
    return [write_jsonl(d / f"{k}.jsonl", r) for k, r in enumerate(records)]


def _shards(d: Path, inputs: list[Path], n: int = 3, **extra) -> list[str]:
    prefixes = []
    for i in range(n):
        prefix = d / f"shard{i}"
        summary = run_preprocess(prefix, inputs, shard=f"{i}/{n}", **{**OPTIONS, **extra})
        assert summary["shard"]["index"] == i and summary["shard"]["count"] == n
        prefixes.append(str(prefix))
    return prefixes


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_three_shards_merged_equal_one_job(tmp_path, kind):
    inputs = _inputs(tmp_path / "in", kind)
    one = run_preprocess(tmp_path / "one", inputs, **OPTIONS)
    assert one["valid"] and one["train"]
    shards = _shards(tmp_path, inputs)
    merged = merge_datasets(shards[::-1], str(tmp_path / "merged"), verify=True)  # any order
    for out in OUTPUTS:
        assert same_files(f"{tmp_path / 'merged'}_{out}", f"{tmp_path / 'one'}_{out}"), out
    for key in ("documents", "tokens", "skipped_total", "skipped"):
        assert merged[key] == one[key], key
    for split in ("train", "valid"):
        assert merged[split]["documents"] == one[split]["documents"]
        assert merged[split]["tokens"] == one[split]["tokens"]
    written = json.loads(Path(f"{tmp_path / 'merged'}_summary.json").read_text())
    assert written["documents"] == one["documents"] and written["verified"]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("set")
    inputs = _inputs(d / "in", "jsonl")
    return d, inputs, _shards(d, inputs)


def test_missing_and_repeated_shards_are_refused_naming_them(tmp_path, shard_set):
    _, _, shards = shard_set
    with pytest.raises(PreprocessError, match=r"shard\(s\) 1/3 missing"):
        merge_datasets([shards[0], shards[2]], str(tmp_path / "m"))
    with pytest.raises(PreprocessError, match=rf"1/3 is given twice: {shards[1]} and {shards[1]}"):
        merge_datasets([shards[0], shards[1], shards[1], shards[2]], str(tmp_path / "m"))
    with pytest.raises(PreprocessError, match=r"no readable .*nowhere_summary.json"):
        merge_datasets([*shards, str(tmp_path / "nowhere")], str(tmp_path / "m"))
    assert not Path(f"{tmp_path / 'm'}_text_document.bin").exists()


def test_shards_of_another_job_or_tokenizer_are_refused(tmp_path, shard_set):
    d, inputs, shards = shard_set
    other = tmp_path / "other1"
    run_preprocess(other, inputs, shard="1/3", **{**OPTIONS, "split_seed": 5})
    with pytest.raises(PreprocessError, match=rf"shard {other} belongs to another preprocess job"):
        merge_datasets([shards[0], str(other), shards[2]], str(tmp_path / "m"))
    # A shard tokenized with another vocabulary (its summary says which).
    summary_path = Path(f"{other}_summary.json")
    summary = json.loads(summary_path.read_text())
    summary["tokenizer"]["sha256"] = "0" * 64
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(PreprocessError, match=rf"shard {other} has tokenizer sha256"):
        merge_datasets([shards[0], str(other), shards[2]], str(tmp_path / "m"))


def test_unfinished_shard_is_refused(tmp_path, shard_set):
    d, inputs, shards = shard_set
    prefix = tmp_path / "half"

    def stop(kind, manifest):
        if kind == "commit" and manifest["state"]["documents"]["train"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_preprocess(prefix, inputs, shard="1/3", on_event=stop, **OPTIONS)
    with pytest.raises(PreprocessError, match=rf"shard {prefix} is unfinished"):
        merge_datasets([shards[0], str(prefix), shards[2]], str(tmp_path / "m"))
    run_preprocess(prefix, inputs, shard="1/3", **OPTIONS)  # resumes on its own
    merge_datasets([shards[0], str(prefix), shards[2]], str(tmp_path / "m"))
    merge_datasets(shards, str(tmp_path / "ref"))
    assert same_files(f"{tmp_path / 'm'}_text_document", f"{tmp_path / 'ref'}_text_document")


def test_shard_options_are_checked(tmp_path, shard_set):
    _, inputs, _ = shard_set
    with pytest.raises(ValueError, match="--shard must be I/N"):
        run_preprocess(tmp_path / "x", inputs, shard="3/3")
    with pytest.raises(ValueError, match="--max-docs cannot be combined with --shard"):
        run_preprocess(tmp_path / "x", inputs, shard="0/3", max_docs=5)
    with pytest.raises(PreprocessError, match="--shard 0/6: the input has 5 files"):
        run_preprocess(tmp_path / "x", inputs, shard="0/6")


def test_slurm_launcher_dry_run_prints_the_array_and_the_merge(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "SHARDS": "3", "INPUT": "/data/fineweb/*.parquet"}
    env["OUTPUT_PREFIX"] = "/data/out/fwe"
    proc = subprocess.run(
        ["bash", str(REPO / "examples/launch/preprocess_slurm.sh")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "sbatch" in out and "--array=0-2" in out and "--dependency=afterok:" in out
    assert "--shard ${SLURM_ARRAY_TASK_ID}/3" in out or "--shard \\${SLURM_ARRAY_TASK_ID}/3" in out
    assert "merge-datasets /data/out/fwe_shard0 /data/out/fwe_shard1 /data/out/fwe_shard2" in out


def test_local_launcher_runs_the_shards_and_merges(tmp_path, shard_set):
    d, inputs, _ = shard_set
    one = tmp_path / "one"
    run_preprocess(one, inputs, **OPTIONS)
    env = {**os.environ, "LOCAL": "1", "SHARDS": "3", "INPUT": str(d / "in")}
    env.update(OUTPUT_PREFIX=str(tmp_path / "loc"), MQK="megatron-qk", PYTHON=sys.executable)
    env["EXTRA_ARGS"] = "--valid-fraction 0.2 --workers 1 --no-progress"
    proc = subprocess.run(
        ["bash", str(REPO / "examples/launch/preprocess_slurm.sh")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for out in OUTPUTS:
        assert same_files(f"{tmp_path / 'loc'}_{out}", f"{one}_{out}"), out
