"""Resumption after real interruptions, completion semantics, and the deterministic split."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import (
    fineweb_rows,
    pydoc_docs,
    read_docs_numpy,
    run_preprocess,
    same_files,
    text_records,
    write_jsonl,
    write_parquet,
)
from preprocess_signals import PausedRun

from megatron_qk.data.readers import PreprocessError, iter_raw_batches, resolve_inputs
from megatron_qk.data.records import (
    RecordConfig,
    select_documents,
    split_hash,
    valid_split_threshold,
)
from megatron_qk.data.tokenizer import load_gpt2_encoding
from megatron_qk.data.workdir import OutputPaths, WorkDir

OUTPUTS = ("text_document", "valid_text_document")
COMPARED = ("documents", "tokens", "skipped", "skipped_examples", "blank_lines", "train", "valid")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three sources of different formats, with bad records and blank lines mixed in."""
    d = tmp_path_factory.mktemp("inputs")
    docs = pydoc_docs()
    records = text_records(docs[:30])
    records[5:5] = [b"{broken", {"text": ""}, b""]
    a = write_jsonl(d / "a.jsonl", records)
    b = write_jsonl(d / "b.jsonl.gz", text_records(docs[30:55], start_id=30) + [{"x": 1}], gz=True)
    c = write_parquet(d / "c.parquet", fineweb_rows(docs[55:]), row_group_size=5)
    return [a, b, c]


def _interrupt_at(n: int, event: str = "commit"):
    seen = []

    def hook(kind, manifest):
        if kind == event:
            seen.append(manifest)
            if len(seen) == n:
                raise KeyboardInterrupt

    return hook


def _same_outputs(a: Path, b: Path) -> bool:
    return all(same_files(f"{a}_{o}", f"{b}_{o}") for o in OUTPUTS)


OPTIONS = {"shard_size": 7, "chunk_bytes": 3000, "valid_fraction": 0.25}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("ref") / "ref"
    return prefix, run_preprocess(prefix, inputs, **OPTIONS)


@pytest.mark.parametrize("stop_at", [1, 2, 6, 12])
def test_interrupted_run_resumes_byte_identical(tmp_path, inputs, reference, stop_at):
    ref_prefix, ref_summary = reference
    prefix = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(prefix, inputs, on_event=_interrupt_at(stop_at), **OPTIONS)
    paths = OutputPaths(str(prefix))
    assert not any(Path(f"{prefix}_{o}.{e}").exists() for o in OUTPUTS for e in ("bin", "idx"))
    assert not paths.summary.exists()
    manifest = json.loads((paths.work_dir / "manifest.json").read_text())
    assert manifest["phase"] == "running"
    # Bytes written after the last commit (a crash between commits) must be discarded.
    for name in ("train.bin", "train.lens", "valid.bin"):
        with open(paths.work_dir / name, "ab") as f:
            f.write(b"\x07" * 13)

    summary = run_preprocess(prefix, inputs, **OPTIONS)
    assert summary["resumed"] is True
    assert summary["resumed_from"]["documents"] == sum(manifest["state"]["documents"].values())
    assert _same_outputs(prefix, ref_prefix)
    for key in COMPARED:
        if key in ("train", "valid"):
            assert summary[key]["documents"] == ref_summary[key]["documents"]
        else:
            assert summary[key] == ref_summary[key], key
    assert not paths.work_dir.exists()


@pytest.mark.parametrize("limit", [{"max_docs": 61}, {"max_tokens": 100_000}])
def test_interrupted_run_with_limits_resumes_identical(tmp_path, inputs, limit):
    options = {**OPTIONS, **limit}
    full = run_preprocess(tmp_path / "ref", inputs, **options)
    assert full["limit_reached"]
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(tmp_path / "run", inputs, on_event=_interrupt_at(5), **options)
    summary = run_preprocess(tmp_path / "run", inputs, **options)
    assert summary["resumed"] and _same_outputs(tmp_path / "run", tmp_path / "ref")
    assert (summary["documents"], summary["tokens"]) == (full["documents"], full["tokens"])
    assert summary["skipped"] == full["skipped"]


def test_interrupted_hub_stream_resumes(tmp_path):
    from megatron_qk.data.pipeline import PreprocessConfig, preprocess
    from megatron_qk.data.readers import HubDataset

    shard = write_parquet(tmp_path / "s.parquet", fineweb_rows(pydoc_docs(40)), row_group_size=3)
    run_preprocess(tmp_path / "local", [shard], shard_size=5, chunk_bytes=2000)

    def config():
        hub = HubDataset(name="parquet", data_files=(str(shard),))
        return PreprocessConfig(
            output_prefix=str(tmp_path / "hub"),
            hf=hub,
            shard_size=5,
            chunk_bytes=2000,
            progress=False,
        )

    with pytest.raises(KeyboardInterrupt):
        preprocess(config(), on_event=_interrupt_at(4))
    assert preprocess(config())["resumed"]
    assert same_files(tmp_path / "hub_text_document", tmp_path / "local_text_document")


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    corpus = write_jsonl(d / "big.jsonl", text_records(pydoc_docs() * 30))
    run_preprocess(d / "ref", [corpus])
    return corpus, d / "ref_text_document"


def _cli(corpus: Path, prefix: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_qk.cli", "preprocess", "--input", str(corpus)]
    return cmd + ["--output-prefix", str(prefix), "--shard-size", "40", "--no-progress", *extra]


def test_sigkill_mid_run_then_resume(tmp_path, big_corpus):
    """A real hard kill (no cleanup handlers run) mid-run, then the same command again."""
    corpus, reference = big_corpus
    prefix = tmp_path / "run"
    cmd = _cli(corpus, prefix, "--workers", "1")
    manifest_path = OutputPaths(str(prefix)).work_dir / "manifest.json"
    run = PausedRun(cmd, "commit:2")  # the first commit with documents (the first is empty)
    run.proc.send_signal(signal.SIGKILL)
    rc, _ = run.wait()
    assert rc == -signal.SIGKILL
    assert not Path(f"{prefix}_text_document.bin").exists()
    committed = json.loads(manifest_path.read_text())["state"]["documents"]["train"]
    assert 0 < committed < len(pydoc_docs()) * 30

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    assert same_files(f"{prefix}_text_document", reference)


@pytest.mark.parametrize("pause", ["workers_started", "commit:2", "finalizing"])
def test_ctrl_c_with_process_workers_then_resume(tmp_path, big_corpus, pause):
    """SIGINT to the whole process group, as a terminal's Ctrl-C (default process backend),
    while the workers start, between commits, and while the outputs are published."""
    corpus, reference = big_corpus
    prefix = tmp_path / "run"
    cmd = _cli(corpus, prefix, "--workers", "2")
    run = PausedRun(cmd, pause)
    run.signal_group(signal.SIGINT)
    rc, err = run.wait()
    assert rc == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert not Path(f"{prefix}_text_document.bin").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    # An interruption while publishing is completed from the work directory's own summary.
    assert summary["resumed"] is (pause != "finalizing") and summary["backend"] == "process"
    assert same_files(f"{prefix}_text_document", reference)


def test_crash_while_publishing_is_completed_on_rerun(tmp_path, inputs, reference):
    ref_prefix, _ = reference
    prefix = tmp_path / "fin"
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(prefix, inputs, on_event=_interrupt_at(1, "finalizing"), **OPTIONS)
    manifest = json.loads((OutputPaths(str(prefix)).work_dir / "manifest.json").read_text())
    assert manifest["phase"] == "finalizing"
    src, dst = manifest["renames"][0]  # the crash happened after the first rename
    os.replace(src, dst)
    summary = run_preprocess(prefix, inputs, **OPTIONS)
    assert _same_outputs(prefix, ref_prefix) and summary["documents"] > 0
    assert not OutputPaths(str(prefix)).work_dir.exists()


def test_changed_options_refused_then_overwrite(tmp_path, inputs):
    prefix = tmp_path / "chg"
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(prefix, inputs, on_event=_interrupt_at(3), **OPTIONS)
    with pytest.raises(
        PreprocessError, match=r"different inputs or options \(changed: valid_fraction"
    ):
        run_preprocess(prefix, inputs, **{**OPTIONS, "valid_fraction": 0.5})
    summary = run_preprocess(prefix, inputs, overwrite=True, **{**OPTIONS, "valid_fraction": 0.5})
    assert summary["resumed"] is False and summary["valid_fraction"] == 0.5


def test_rerun_after_completion_and_stale_outputs(tmp_path, inputs):
    prefix = tmp_path / "done"
    run_preprocess(prefix, inputs, **OPTIONS)
    bin_path = Path(f"{prefix}_text_document.bin")
    mtime = bin_path.stat().st_mtime_ns
    again = run_preprocess(prefix, inputs, **OPTIONS)
    assert again["already_complete"] and bin_path.stat().st_mtime_ns == mtime
    # A new run without a validation split removes the old run's validation files.
    run_preprocess(prefix, inputs, shard_size=7)
    assert not Path(f"{prefix}_valid_text_document.bin").exists()
    assert json.loads(Path(f"{prefix}_summary.json").read_text())["valid"] is None


def test_concurrent_run_on_same_prefix_is_refused(tmp_path, inputs):
    work = WorkDir(OutputPaths(str(tmp_path / "lock")).work_dir)
    work.acquire()
    try:
        with pytest.raises(PreprocessError, match="another preprocess run holds"):
            run_preprocess(tmp_path / "lock", inputs)
    finally:
        work.release()


def _decoded(prefix) -> list[str]:
    enc = load_gpt2_encoding()
    return [enc.decode(ids[:-1]) for ids in read_docs_numpy(prefix)]


def test_validation_split_is_deterministic_disjoint_and_order_free(tmp_path):
    docs = [f"Document {i}: " + "lorem ipsum " * (i % 7) for i in range(1500)]
    path = write_jsonl(tmp_path / "d.jsonl", text_records(docs))
    run_preprocess(tmp_path / "a", [path], valid_fraction=0.1, workers=1)
    run_preprocess(tmp_path / "b", [path], valid_fraction=0.1, workers=3, chunk_bytes=800)
    assert _same_outputs(tmp_path / "a", tmp_path / "b")
    train, valid = (
        _decoded(tmp_path / "a_text_document"),
        _decoded(tmp_path / "a_valid_text_document"),
    )
    assert not set(train) & set(valid) and sorted(train + valid) == sorted(docs)
    assert 100 <= len(valid) <= 200  # 150 expected; the binomial sd is about 12
    threshold = valid_split_threshold(0.1)
    assert valid == [d for d in docs if split_hash(d.encode()) < threshold]

    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    spath = write_jsonl(tmp_path / "s.jsonl", text_records(shuffled))
    run_preprocess(tmp_path / "s", [spath], valid_fraction=0.1)
    assert sorted(_decoded(tmp_path / "s_valid_text_document")) == sorted(valid)

    run_preprocess(tmp_path / "seed", [path], valid_fraction=0.1, split_seed=1)
    assert _decoded(tmp_path / "seed_valid_text_document") != valid


def test_split_by_text_keeps_duplicates_together_and_by_id_uses_ids(tmp_path):
    records = [{"text": "same text", "id": f"id-{i}"} for i in range(200)]
    records += [{"text": f"unique {i}", "id": "shared-id"} for i in range(50)]
    records.append({"text": "no id here"})
    path = write_jsonl(tmp_path / "dup.jsonl", records)
    run_preprocess(tmp_path / "t", [path], valid_fraction=0.5)
    valid = _decoded(tmp_path / "t_valid_text_document")
    train = _decoded(tmp_path / "t_text_document")
    assert valid.count("same text") in (0, 200)
    summary = run_preprocess(tmp_path / "i", [path], valid_fraction=0.5, split_by="id")
    valid = _decoded(tmp_path / "i_valid_text_document")
    assert 0 < valid.count("same text") < 200  # distinct ids spread the duplicates
    assert sum(v.startswith("unique") for v in valid) in (0, 50)  # one id, one split
    assert summary["split_by_text_fallbacks"] == 1
    assert len(train) + len(_decoded(tmp_path / "t_valid_text_document")) == len(records)


def test_batches_stay_bounded_when_every_record_is_skipped(tmp_path):
    path = write_jsonl(tmp_path / "skip.jsonl", [{"text": ""}] * 5000 + [{"text": "last"}])
    batches = list(iter_raw_batches(resolve_inputs([str(path)]), max_records=256))
    assert max(b.num_records for b in batches) <= 256
    assert batches[-1].end_of_source and batches[-1].end_record == 5001
    selections = [
        select_documents(b.kind, b.payload, b.first_record, RecordConfig()) for b in batches
    ]
    assert sum(len(s.skips) for s in selections) == 5000 and selections[-1].texts == ["last"]


def test_memory_does_not_grow_with_input_size(tmp_path):
    """Peak RSS for a 3x larger corpus stays (nearly) the same: streaming, no whole-corpus lists."""
    small = write_jsonl(tmp_path / "small.jsonl", text_records(pydoc_docs() * 15))  # ~7 MB
    large = write_jsonl(tmp_path / "large.jsonl", text_records(pydoc_docs() * 45))  # ~22 MB
    code = (
        "import resource, sys; from megatron_qk.cli import main; "
        "rc = main(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )

    def peak_mib(path: Path) -> float:
        argv = ["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / path.stem)]
        argv += ["--workers", "2", "--backend", "thread", "--no-progress"]  # one process: all RSS
        proc = subprocess.run(
            [sys.executable, "-c", code, *argv],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().splitlines()[-1]) / 1024

    extra_input_mib = (large.stat().st_size - small.stat().st_size) / 2**20
    growth_mib = peak_mib(large) - peak_mib(small)
    assert extra_input_mib > 13
    # Holding the extra text alone would add ~15 MiB (its token lists several times more).
    assert growth_mib < 5, (growth_mib, extra_input_mib)


def test_resumed_hub_stream_starts_at_the_parquet_shard_of_the_resume_row(tmp_path, monkeypatch):
    """A resume reopens the stream on the shards from the resume row's shard on (earlier shards
    are not streamed again) and gives the uninterrupted run's files."""
    from megatron_qk.data import readers
    from megatron_qk.data.pipeline import PreprocessConfig, preprocess
    from megatron_qk.data.readers import HubDataset

    docs = pydoc_docs(45)
    shards = [
        str(write_parquet(tmp_path / f"s{k}.parquet", fineweb_rows(docs[15 * k : 15 * k + 15])))
        for k in range(3)
    ]

    def config(prefix: str):
        hub = HubDataset(name="parquet", data_files=tuple(shards))
        return PreprocessConfig(
            output_prefix=str(tmp_path / prefix), hf=hub, shard_size=5, chunk_bytes=2000,
            progress=False,
        )  # fmt: skip

    preprocess(config("ref"))
    with pytest.raises(KeyboardInterrupt):
        preprocess(config("hub"), on_event=_interrupt_at(5))
    opened = []
    real_open = readers.open_hub_dataset
    monkeypatch.setattr(
        readers, "open_hub_dataset", lambda hub: opened.append(hub) or real_open(hub)
    )
    summary = preprocess(config("hub"))
    assert summary["resumed"] and len(opened) == 1
    # The interruption (5 commits of 5 documents) lies past the first shard's 15 rows.
    assert opened[0].data_files in (tuple(shards[1:]), tuple(shards[2:]))
    assert same_files(tmp_path / "hub_text_document", tmp_path / "ref_text_document")
