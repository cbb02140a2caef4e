"""GPT-2 BPE offline: vendored ranks, public ids, tiktoken equality, cache seeding, fetch, CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from data_fixtures import GPT2_PATTERN, TRICKY_DOCS, pydoc_docs, train_toy_bpe, write_tiktoken_file

from megatron_qk import cli
from megatron_qk.data import tokenizer as tok
from megatron_qk.data import tokenizer_files as files

GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# Public GPT-2 ids: tiktoken's tests/test_encoding.py and widely quoted examples.
PUBLIC_IDS = {
    "hello world": [31373, 995],
    "Hello world": [15496, 995],
    "Hello, world!": [15496, 11, 995, 0],
    "0": [15],
    "00": [405],
    "000": [830],
    "0000": [2388],
    "00000": [20483],
    "000000": [10535],
    "0000000": [24598],
    "00000000": [8269],
    "000000000": [10535, 830],
    "0000000000000000": [25645],
    "00000000000000000": [8269, 10535, 830],
}


@pytest.fixture(scope="module")
def gpt2():
    return tok.load_gpt2_encoding()


def test_vendored_asset_is_the_gpt2_rank_file():
    data = gzip.decompress(tok.VENDORED_RANKS.read_bytes())
    assert hashlib.sha256(data).hexdigest() == GPT2_SHA256
    assert len(data.splitlines()) == 50256
    notice = (tok.ASSET_DIR / "LICENSE.gpt2-tiktoken.txt").read_text(encoding="utf-8")
    assert "MIT License" in notice and "Copyright (c) 2022 OpenAI" in notice


def test_public_gpt2_ids(gpt2):
    for text, ids in PUBLIC_IDS.items():
        assert gpt2.encode_ordinary(text) == ids, text
    assert gpt2.encode("hello <|endoftext|>", allowed_special="all") == [31373, 220, 50256]
    assert tok.EOD_TOKEN_ID == gpt2.eot_token == 50256
    assert gpt2.n_vocab == 50257
    assert gpt2.name == "gpt2"


def test_roundtrip_and_special_text_is_ordinary(gpt2):
    for doc in TRICKY_DOCS:
        ids = gpt2.encode_ordinary(doc)
        assert gpt2.decode(ids) == doc
        assert 50256 not in ids  # "<|endoftext|>" inside a document never becomes EOD


def test_equals_tiktoken_get_encoding_gpt2_offline(tmp_path, monkeypatch, gpt2):
    """Seed a fresh cache, forbid downloads, and compare with tiktoken's own gpt2 on a corpus."""
    import tiktoken
    import tiktoken.load
    import tiktoken.registry

    data = tok.read_rank_bytes(tok.VENDORED_RANKS)
    seeded = files.seed_tiktoken_cache(tmp_path / "cache", data)
    assert {p.name for p in seeded.values()} == {
        "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4",  # sha1 of the r50k_base.tiktoken URL
        "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",  # vocab.bpe
        "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",  # encoder.json
    }

    def no_network(url):
        raise AssertionError(f"tiktoken tried to download {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # no encoding cached in-process
    for name in ("gpt2", "r50k_base"):
        ref = tiktoken.get_encoding(name)
        assert ref._mergeable_ranks == gpt2._mergeable_ranks
        assert ref._pat_str == gpt2._pat_str == GPT2_PATTERN
        assert ref._special_tokens == gpt2._special_tokens
        for doc in pydoc_docs() + TRICKY_DOCS:
            assert gpt2.encode_ordinary(doc) == ref.encode_ordinary(doc)


def test_rebuilt_data_gym_files_match_tiktoken_hashes():
    encoder_json, vocab_bpe = files.verified_data_gym_files(tok.read_rank_bytes(tok.VENDORED_RANKS))
    assert hashlib.sha256(vocab_bpe).hexdigest() == files.VOCAB_BPE_SHA256
    assert hashlib.sha256(encoder_json).hexdigest() == files.ENCODER_JSON_SHA256
    assert json.loads(encoder_json)["<|endoftext|>"] == 50256


def test_load_ignores_read_only_tiktoken_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    path = tmp_path / "gpt2.tiktoken"
    path.write_bytes(tok.read_rank_bytes(tok.VENDORED_RANKS))
    assert tok.load_gpt2_encoding(path).encode_ordinary("hello world") == [31373, 995]
    assert not (blocker.parent / "cache").exists()


def test_tampered_rank_file_is_rejected(tmp_path):
    data = bytearray(tok.read_rank_bytes(tok.VENDORED_RANKS))
    data[100] ^= 1
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(bytes(data))
    with pytest.raises(tok.TokenizerError, match=f"gpt2.tiktoken.*{GPT2_SHA256}"):
        tok.load_gpt2_encoding(bad)
    with pytest.raises(tok.TokenizerError, match="not found"):
        tok.load_gpt2_encoding(tmp_path / "missing.tiktoken")


def test_load_tokenizer_gzip_and_custom_rank_file(tmp_path, caplog):
    gz = tmp_path / "gpt2.tiktoken.gz"
    gz.write_bytes(tok.VENDORED_RANKS.read_bytes())
    info = tok.load_tokenizer(str(gz))
    assert info.is_gpt2 and info.eod_id == 50256 and info.dtype_name == "uint16"

    import tiktoken

    ranks = train_toy_bpe(" ".join(pydoc_docs(5)), num_merges=40)
    path = write_tiktoken_file(tmp_path / "toy.tiktoken", ranks)
    # An unknown rank file alone says nothing about its split pattern or EOD: refused.
    with pytest.raises(tok.TokenizerError, match="r50k_base.*cl100k_base.*NAME:FILE"):
        tok.load_tokenizer(str(path))
    info = tok.load_tokenizer(f"r50k_base:{path}")
    assert not info.is_gpt2 and "not tiktoken's r50k_base rank file" in caplog.text
    assert info.eod_id == 50256 and info.vocab_size == 50257
    ref = tiktoken.Encoding("ref", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for doc in TRICKY_DOCS:
        assert info.encoding.encode_ordinary(doc) == ref.encode_ordinary(doc)

    broken = tmp_path / "broken.tiktoken"
    broken.write_text("aGVsbG8= 0\nnot-base64!! 1\n")
    with pytest.raises(tok.TokenizerError, match=r"broken.tiktoken:2"):
        tok.load_tokenizer(f"cl100k_base:{broken}")


def _fake_sdist(path: Path, payload: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("openai_whisper-20250625/whisper/assets/gpt2.tiktoken")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


def test_extract_ranks_from_sdist(tmp_path):
    data = tok.read_rank_bytes(tok.VENDORED_RANKS)
    assert files.extract_ranks_from_sdist(_fake_sdist(tmp_path / "good.tar.gz", data)) == data
    with pytest.raises(tok.TokenizerError, match="sha256"):
        files.extract_ranks_from_sdist(_fake_sdist(tmp_path / "bad.tar.gz", data[:-10]))
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(tok.TokenizerError, match="cannot read sdist"):
        files.extract_ranks_from_sdist(tmp_path / "junk.tar.gz")


def test_fetch_from_pypi_verifies_the_sdist_hash_without_pip(tmp_path):
    """Tampered bytes on the index are refused (the full offline fetch: test_security_tokenizer)."""
    sdist = _fake_sdist(tmp_path / "openai_whisper-20250625.tar.gz", b"tampered")
    index = tmp_path / "simple" / "openai-whisper"
    index.mkdir(parents=True)
    (index / "index.html").write_text(f'<a href="{sdist.as_uri()}">{sdist.name}</a>')

    def opener(url):
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        return open(path / "index.html" if path.is_dir() else path, "rb")

    with pytest.raises(tok.TokenizerError, match="is not the pinned 37a91a39"):
        files.fetch_ranks_from_pypi(tmp_path / "dl", index=(tmp_path / "simple").as_uri(),
                                    opener=opener)  # fmt: skip
    assert not (tmp_path / "dl").exists()


def test_tokenizer_cli_fetch_vendored_verify_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "ranks" / "gpt2.tiktoken"
    assert cli.main(["tokenizer", "fetch", "--source", "vendored", "--output", str(out)]) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == GPT2_SHA256
    assert len(list((tmp_path / "cache").iterdir())) == 3
    assert cli.main(["tokenizer", "verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'OK   tiktoken.get_encoding("gpt2")' in printed and "FAIL" not in printed

    assert cli.main(["tokenizer", "export", "--out", str(tmp_path / "exp")]) == 0
    names = {p.name for p in (tmp_path / "exp").iterdir()}
    assert names == {"gpt2.tiktoken", "encoder.json", "vocab.bpe"}
    out.write_bytes(out.read_bytes()[:-5])
    assert cli.main(["tokenizer", "verify", str(out)]) == 1
    assert "sha256" in capsys.readouterr().err
    assert cli.main(["tokenizer", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(tok.VENDORED_RANKS)
