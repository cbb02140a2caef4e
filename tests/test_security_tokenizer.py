"""Tokenizer fetch runs nothing it downloads; hostile gzip inputs are cut off at stated limits."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from data_fixtures import run_preprocess

from megatron_qk.data import readers, sdist_fetch
from megatron_qk.data import tokenizer as tok
from megatron_qk.data import tokenizer_files as files
from megatron_qk.data.readers import PreprocessError


def _file_opener(url: str):
    path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    return open(path / "index.html" if path.is_dir() else path, "rb")


def _index(tmp_path: Path, project: str, payload: Path) -> str:
    page = tmp_path / "simple" / project
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<a href="{payload.as_uri()}#sha256=0">{payload.name}</a>\n')
    return (tmp_path / "simple").as_uri()


def test_fetch_never_runs_pip_or_a_build_step(tmp_path, monkeypatch):
    """An sdist whose setup.py would touch a marker is refused by hash; no process is started."""
    marker = tmp_path / "pwned"
    evil = tmp_path / files.WHISPER_SDIST_FILE
    evil.write_bytes(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n".encode())

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    index = _index(tmp_path, files.WHISPER_PROJECT, evil)
    with pytest.raises(tok.TokenizerError, match="is not the pinned"):
        files.fetch_ranks_from_pypi(index=index, opener=_file_opener)
    assert not marker.exists()


def test_download_is_hash_checked_and_bounded(tmp_path):
    payload = tmp_path / "pkg-1.0.tar.gz"
    payload.write_bytes(b"p" * 5000)
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    url = sdist_fetch.find_file_url(_index(tmp_path, "pkg", payload), "pkg", payload.name,
                                    opener=_file_opener)  # fmt: skip
    assert sdist_fetch.download_verified(url, digest, opener=_file_opener) == b"p" * 5000
    with pytest.raises(tok.TokenizerError, match="larger than 4096 bytes"):
        sdist_fetch.download_verified(url, digest, opener=_file_opener, max_bytes=4096)
    with pytest.raises(tok.TokenizerError, match="does not list other-1.0.tar.gz"):
        sdist_fetch.find_file_url((tmp_path / "simple").as_uri(), "pkg", "other-1.0.tar.gz",
                                  opener=_file_opener)  # fmt: skip


def test_gzip_bomb_as_tokenizer_file_is_cut_off(tmp_path):
    bomb = tmp_path / "bomb.tiktoken.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        chunk = b"\0" * (1 << 20)
        for _ in range(tok.MAX_RANK_FILE_BYTES // len(chunk) + 1):
            f.write(chunk)
    assert bomb.stat().st_size < 1 << 20  # a small file on disk
    with pytest.raises(tok.TokenizerError, match="larger than .* once decompressed"):
        tok.read_rank_bytes(bomb)
    assert tok.MAX_RANK_FILE_BYTES == 64 * 1024 * 1024  # the documented limit


def test_gzip_jsonl_without_newline_is_cut_off(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1 << 20)  # the same code path, 1 MiB bound
    source = tmp_path / "one_line.jsonl.gz"
    with gzip.open(source, "wb") as f:
        f.write(b'{"text": "' + b"a" * (3 << 20))  # 3 MiB, no newline
    with pytest.raises(PreprocessError, match=r"line 1 is longer than 1048576 bytes"):
        run_preprocess(tmp_path / "out", [source])
