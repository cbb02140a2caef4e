"""Inputs and robustness: every bad-record kind, strict mode, formats, limits, hub adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    fineweb_rows,
    pydoc_docs,
    run_preprocess,
    text_records,
    write_jsonl,
    write_parquet,
)

from megatron_qk import cli
from megatron_qk.data.pipeline import PreprocessConfig, preprocess
from megatron_qk.data.readers import HubDataset, PreprocessError, resolve_inputs
from megatron_qk.data.tokenizer import load_gpt2_encoding

GOOD = {"text": "A good document.", "id": "g"}
# (raw line, skip reason); line numbers below are 1-based positions in BAD_FILE.
BAD_LINES = [
    (b"{bad json", "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"id": "no text"}', "missing_text"),
    (b'{"text": null}', "non_string_text"),
    (b'{"text": 42}', "non_string_text"),
    (b'{"text": ["a", "list"]}', "non_string_text"),
    (b'{"text": ""}', "empty_text"),
    (b'{"text": "  \\n\\t "}', "empty_text"),
    (b'{"text": "caf\xe9 latin-1"}', "invalid_utf8"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),
]


def _doc_tokens(prefix: Path) -> list[int]:
    """Per-document token counts of an output, from its .idx (no megatron import needed)."""
    idx = Path(f"{prefix}.idx").read_bytes()
    count = int.from_bytes(idx[18:26], "little")
    return np.frombuffer(idx[34 : 34 + 4 * count], dtype=np.int32).tolist()


def _bad_file(tmp_path: Path) -> Path:
    lines = [json.dumps(GOOD).encode()]
    for raw, _ in BAD_LINES:
        lines.append(raw)
    lines += [b"", b"   ", json.dumps({**GOOD, "text": "Another good one."}).encode()]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path, caplog):
    path = _bad_file(tmp_path)
    summary = run_preprocess(tmp_path / "out", [path])
    expected: dict[str, int] = {}
    for _, reason in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert {k: v for k, v in summary["skipped"].items() if v} == expected
    assert summary["skipped_total"] == len(BAD_LINES)
    assert summary["blank_lines"] == 2
    assert summary["documents"] == 2
    enc = load_gpt2_encoding()
    lengths = [len(enc.encode_ordinary(t)) + 1 for t in ("A good document.", "Another good one.")]
    assert _doc_tokens(tmp_path / "out_text_document") == lengths
    examples = summary["skipped_examples"]
    assert len(examples) == 10
    assert [(e["line"], e["reason"]) for e in examples] == [
        (i + 2, reason) for i, (_, reason) in enumerate(BAD_LINES)
    ]
    assert all(e["file"] == str(path.resolve()) for e in examples)
    assert f"{path.resolve()}:2 (malformed_json)" in caplog.text
    on_disk = json.loads((tmp_path / "out_summary.json").read_text())
    assert on_disk["skipped"] == summary["skipped"]


@pytest.mark.parametrize("raw,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_strict_mode_fails_at_file_and_line(tmp_path, raw, reason):
    path = tmp_path / "strict.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + raw + b"\n" + json.dumps(GOOD).encode())
    with pytest.raises(PreprocessError, match=rf"strict.jsonl:3: bad record \(line 3\): {reason}"):
        run_preprocess(tmp_path / "out", [path], strict=True, workers=1)
    assert not (tmp_path / "out_text_document.bin").exists()


def test_cli_strict_error_and_summary_line(tmp_path, capsys):
    path = _bad_file(tmp_path)
    args = ["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o")]
    assert cli.main([*args, "--strict", "--no-progress"]) == 1
    assert f"{path.resolve()}:2: bad record (line 2): malformed_json" in capsys.readouterr().err
    assert cli.main([*args, "--no-progress", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("preprocess: 2 documents;") and "skipped 10 (" in out
    assert "malformed_json=1" in out and "tokens/s" in out


def test_all_records_bad_is_an_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "x.jsonl", [b"nope", b'{"text": ""}'])
    argv = ["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o")]
    assert cli.main([*argv, "--no-progress"]) == 1
    assert "no documents were written" in capsys.readouterr().err
    assert not (tmp_path / "o_text_document.bin").exists()


def test_missing_and_unsupported_inputs(tmp_path, capsys):
    with pytest.raises(PreprocessError, match="input not found: .*nope.jsonl"):
        resolve_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(PreprocessError, match="no input files .* match"):
        resolve_inputs([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreprocessError, match="holds no"):
        resolve_inputs([str(tmp_path / "empty")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PreprocessError, match="unsupported input format"):
        resolve_inputs([str(tmp_path / "notes.txt")])
    argv = ["preprocess", "--input", str(tmp_path / "nope.jsonl"), "--output-prefix", "o"]
    assert cli.main(argv) == 1
    assert "nope.jsonl" in capsys.readouterr().err
    assert cli.main(["preprocess", "--output-prefix", "o"]) == 2


def test_directories_globs_order_and_duplicates(tmp_path):
    d = tmp_path / "data"
    write_jsonl(d / "b" / "2.jsonl.gz", text_records(["two"]), gz=True)
    write_jsonl(d / "1.jsonl", text_records(["one"]))
    write_parquet(d / "c" / "3.parquet", fineweb_rows(["three"]))
    (d / "README.md").write_text("ignored")
    files = resolve_inputs([str(d), str(d / "**" / "*.jsonl*")])
    assert [f.path.name for f in files] == ["1.jsonl", "2.jsonl.gz", "3.parquet"]
    assert [f.fmt for f in files] == ["jsonl", "jsonl.gz", "parquet"]
    summary = run_preprocess(tmp_path / "out", [d])
    assert summary["documents"] == 3
    enc = load_gpt2_encoding()
    expected = [len(enc.encode_ordinary(t)) + 1 for t in ("one", "two", "three")]
    assert _doc_tokens(tmp_path / "out_text_document") == expected


def test_gzip_equals_plain_and_corrupt_gzip_is_an_error(tmp_path):
    records = text_records(pydoc_docs(20))
    plain = write_jsonl(tmp_path / "p.jsonl", records)
    gz = write_jsonl(tmp_path / "g.jsonl.gz", records, gz=True)
    run_preprocess(tmp_path / "plain", [plain])
    run_preprocess(tmp_path / "gz", [gz])
    for ext in ("bin", "idx"):
        a = (tmp_path / f"plain_text_document.{ext}").read_bytes()
        assert a == (tmp_path / f"gz_text_document.{ext}").read_bytes()
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(PreprocessError, match=r"t.jsonl.gz: read error after line \d+"):
        run_preprocess(tmp_path / "t", [truncated])
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b'{"text": "not gzip"}\n')
    with pytest.raises(PreprocessError, match="fake.jsonl.gz: not a gzip file"):
        run_preprocess(tmp_path / "f", [fake])


def test_parquet_errors_and_records(tmp_path):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(PreprocessError, match="garbage.parquet: not a readable parquet file"):
        run_preprocess(tmp_path / "g", [garbage])
    nocol = write_parquet(tmp_path / "nocol.parquet", {"content": ["hello"]})
    with pytest.raises(PreprocessError, match=r"no column 'text' \(columns: content\)"):
        run_preprocess(tmp_path / "n", [nocol])
    summary = run_preprocess(tmp_path / "c", [nocol], text_key="content")
    assert summary["documents"] == 1
    with pytest.raises(PreprocessError, match="no column 'int_score'.*--min-int-score"):
        run_preprocess(tmp_path / "s", [nocol], text_key="content", min_int_score=3)

    import pyarrow as pa

    raw = pa.array([b"fine text", b"bad \xff\xfe utf8", None, b"also fine", b""], pa.binary())
    text = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers(), null_count=1)
    bad = write_parquet(tmp_path / "bad.parquet", {"text": text}, row_group_size=2)
    summary = run_preprocess(tmp_path / "b", [bad])
    assert summary["documents"] == 2
    assert {k: v for k, v in summary["skipped"].items() if v} == {
        "invalid_utf8": 1,
        "non_string_text": 1,
        "empty_text": 1,
    }
    assert summary["skipped_examples"][0] == {
        "reason": "invalid_utf8",
        "file": str(bad.resolve()),
        "row": 2,
        "detail": summary["skipped_examples"][0]["detail"],
    }


def test_min_int_score_filter(tmp_path):
    docs = pydoc_docs(30)
    scores = [i % 6 for i in range(30)]
    pq_file = write_parquet(tmp_path / "fw.parquet", fineweb_rows(docs, scores), row_group_size=7)
    summary = run_preprocess(tmp_path / "fw", [pq_file], min_int_score=3)
    assert summary["documents"] == sum(s >= 3 for s in scores)
    assert summary["skipped"]["below_min_int_score"] == sum(s < 3 for s in scores)
    enc = load_gpt2_encoding()
    kept = [len(enc.encode_ordinary(d)) + 1 for d, s in zip(docs, scores) if s >= 3]
    assert _doc_tokens(tmp_path / "fw_text_document") == kept

    records = [{"text": "a", "int_score": 4}, {"text": "b"}, {"text": "c", "int_score": "high"}]
    path = write_jsonl(tmp_path / "s.jsonl", records + [{"text": "d", "int_score": 2.5}])
    summary = run_preprocess(tmp_path / "js", [path], min_int_score=3)
    assert summary["documents"] == 1
    assert summary["skipped"]["missing_int_score"] == 2
    assert summary["skipped"]["below_min_int_score"] == 1


def test_max_docs_and_max_tokens(tmp_path):
    docs = pydoc_docs(40)
    records = text_records(docs)
    records.insert(10, {"text": ""})  # a skip before the cut
    records.insert(30, {"text": 1})  # a skip after the cut
    path = write_jsonl(tmp_path / "d.jsonl", records)
    enc = load_gpt2_encoding()
    lengths = [len(enc.encode_ordinary(d)) + 1 for d in docs]

    summary = run_preprocess(tmp_path / "md", [path], max_docs=25, valid_fraction=0.2)
    assert summary["documents"] == 25 and summary["limit_reached"]
    assert summary["skipped_total"] == 1  # the record after the 25th document was never read

    limit = sum(lengths[:17]) - 5  # reached inside the 17th document
    summary = run_preprocess(tmp_path / "mt", [path], max_tokens=limit, chunk_bytes=2000)
    assert _doc_tokens(tmp_path / "mt_text_document") == lengths[:17]
    assert summary["tokens"] >= limit > summary["tokens"] - lengths[16]
    assert summary["skipped_total"] == 1 and summary["limit_reached"]
    exact = run_preprocess(tmp_path / "me", [path], max_tokens=sum(lengths[:3]))
    assert exact["documents"] == 3


def test_hub_adapter_streams_local_parquet(tmp_path):
    """--hf-dataset goes through datasets.load_dataset(streaming=True); same bytes as --input."""
    docs = pydoc_docs(25)
    pq_file = write_parquet(tmp_path / "shard.parquet", fineweb_rows(docs), row_group_size=4)
    run_preprocess(tmp_path / "local", [pq_file], min_int_score=2, valid_fraction=0.3)
    hub = HubDataset(name="parquet", data_files=(str(pq_file),))
    config = PreprocessConfig(
        output_prefix=str(tmp_path / "hub"),
        hf=hub,
        min_int_score=2,
        valid_fraction=0.3,
        workers=2,
        progress=False,
    )
    summary = preprocess(config)
    assert summary["inputs"][0]["hf"]["name"] == "parquet"
    for split in ("text_document", "valid_text_document"):
        for ext in ("bin", "idx"):
            a = (tmp_path / f"local_{split}.{ext}").read_bytes()
            assert a == (tmp_path / f"hub_{split}.{ext}").read_bytes()


def test_hub_dataset_offline_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "megatron_qk.cli", "preprocess", "--no-progress"]
    cmd += ["--hf-dataset", "HuggingFaceFW/fineweb-edu", "--hf-config", "sample-10BT"]
    cmd += ["--output-prefix", str(tmp_path / "fw")]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "cannot open hub dataset 'HuggingFaceFW/fineweb-edu'" in proc.stderr
    assert "--input" in proc.stderr  # tells the user what to do instead
    assert time.time() - t0 < 60


def test_tools_preprocess_data_wrapper_accepts_megatron_lm_flags(tmp_path):
    from megatron_qk.data.tokenizer import VENDORED_RANKS, read_rank_bytes
    from megatron_qk.data.tokenizer_files import export_files

    vocab = export_files(tmp_path / "vocab", read_rank_bytes(VENDORED_RANKS))
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": d} for d in pydoc_docs(10)])
    run_preprocess(tmp_path / "lib", [path], text_key="content")
    tool = Path(__file__).resolve().parent.parent / "tools" / "preprocess_data.py"
    cmd = [sys.executable, str(tool), "--input", str(path), "--output-prefix", str(tmp_path / "t")]
    cmd += ["--json-keys", "content", "--append-eod", "--tokenizer-type", "GPT2BPETokenizer"]
    cmd += ["--vocab-file", str(vocab["encoder.json"]), "--merge-file", str(vocab["vocab.bpe"])]
    cmd += ["--workers", "2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for ext in ("bin", "idx"):
        a = (tmp_path / f"t_text_document.{ext}").read_bytes()
        assert a == (tmp_path / f"lib_text_document.{ext}").read_bytes()
    bad = [*cmd[:-5], "--merge-file", str(vocab["encoder.json"]), "--workers", "1"]
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--merge-file" in proc.stderr and "not GPT-2's" in proc.stderr
