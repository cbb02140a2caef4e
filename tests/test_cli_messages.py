"""Command-line messages that name what to look at (issue 26, item 11)."""

from __future__ import annotations

from megatron_qk.cli import main


def test_empty_jsonl_names_the_file_and_the_summary(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    prefix = tmp_path / "out" / "corpus"
    argv = ["preprocess", "--input", str(empty), "--output-prefix", str(prefix), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"no documents were written from {empty}" in err
    assert f"{prefix}_summary.json" in err
    assert (tmp_path / "out" / "corpus_summary.json").is_file()
