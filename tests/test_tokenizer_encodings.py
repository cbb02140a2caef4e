"""Tokenizers beyond GPT-2 (offline): tiktoken encodings with their own pattern/EOD, HF
tokenizer.json, int32 token files, recipe/data tokenizer checks, and weighted blends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiktoken
from data_fixtures import (
    pydoc_docs,
    read_docs,
    run_preprocess,
    text_records,
    train_toy_bpe,
    valid_tricky_docs,
    write_jsonl,
    write_tiktoken_file,
)

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import load_config
from megatron_qk.data import tokenizer as tok

# tiktoken's published <|endoftext|> ids (tiktoken_ext/openai_public.py).
EOD = {"r50k_base": 50256, "p50k_base": 50256, "cl100k_base": 100257, "o200k_base": 199999}
# With toy ranks (ids < 400) the vocabulary ends at the largest special id.
N_VOCAB = {"r50k_base": 50257, "p50k_base": 50257, "cl100k_base": 100277, "o200k_base": 200019}


@pytest.fixture(scope="module")
def toy_ranks() -> dict[bytes, int]:
    return train_toy_bpe(" ".join(pydoc_docs(6)), num_merges=60)


@pytest.mark.parametrize("name", sorted(EOD))
def test_each_tiktoken_encoding_has_its_own_pattern_specials_and_eod(name, toy_ranks, tmp_path):
    pat, special, sha = tok.tiktoken_definition(name)
    assert special["<|endoftext|>"] == EOD[name] and len(sha) == 64
    path = write_tiktoken_file(tmp_path / "toy.tiktoken", toy_ranks)
    info = tok.load_tokenizer(f"{name}:{path}")
    assert info.eod_id == EOD[name] and info.vocab_size == N_VOCAB[name]
    assert info.encoding._pat_str == pat and info.encoding._special_tokens == special
    assert info.dtype_name == ("uint16" if N_VOCAB[name] < 65500 else "int32")
    ref = tiktoken.Encoding("ref", pat_str=pat, mergeable_ranks=toy_ranks, special_tokens=special)
    for doc in valid_tricky_docs():
        assert info.encoding.encode_ordinary(doc) == ref.encode_ordinary(doc)


def test_patterns_really_differ_between_encodings():
    import regex

    # cl100k splits digits in groups of three and keeps case-insensitive contractions whole.
    cl100k = tok.tiktoken_definition("cl100k_base")[0]
    r50k = tok.tiktoken_definition("r50k_base")[0]
    assert regex.findall(cl100k, "1234567 I'M") == ["123", "456", "7", " I", "'M"]
    assert regex.findall(r50k, "1234567 I'M") == ["1234567", " I", "'", "M"]


def test_unknown_rank_file_needs_its_encoding_named(toy_ranks, tmp_path):
    path = write_tiktoken_file(tmp_path / "mine.tiktoken", toy_ranks)
    with pytest.raises(tok.TokenizerError, match="cl100k_base:"):
        tok.load_tokenizer(str(path))
    # Ranks that reach an encoding's special ids cannot belong to it.
    big = {**toy_ranks, **{f"x{i}".encode(): len(toy_ranks) + i for i in range(50257)}}
    with pytest.raises(tok.TokenizerError, match="special tokens"):
        tok.load_tokenizer(f"r50k_base:{write_tiktoken_file(tmp_path / 'big.tiktoken', big)}")


def test_vocabulary_over_65535_writes_int32_tokens(toy_ranks, tmp_path):
    path = write_tiktoken_file(tmp_path / "toy.tiktoken", toy_ranks)
    docs = valid_tricky_docs()
    data = write_jsonl(tmp_path / "d.jsonl", text_records(docs))
    summary = run_preprocess(tmp_path / "cl", [data], tokenizer=f"cl100k_base:{path}")
    assert summary["tokenizer"]["dtype"] == "int32" and summary["tokenizer"]["eod_id"] == 100257
    assert summary["tokenizer"]["vocab_size"] == 100277
    info = tok.load_tokenizer(f"cl100k_base:{path}")
    expected = [info.encoding.encode_ordinary(d) + [100257] for d in docs]
    assert read_docs(tmp_path / "cl_text_document") == expected  # megatron-core's reader
    bin_size = (tmp_path / "cl_text_document.bin").stat().st_size
    assert bin_size == 4 * sum(map(len, expected))


def _hf_tokenizer_json(path: Path, eod: str = "<|end_of_text|>") -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>", eod],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(pydoc_docs(6), trainer)
    tokenizer.save(str(path))
    return path


def test_hf_tokenizer_json_through_the_same_path(tmp_path):
    from tokenizers import Tokenizer

    path = _hf_tokenizer_json(tmp_path / "tokenizer.json")
    info = tok.load_tokenizer(str(path))
    ref = Tokenizer.from_file(str(path))
    assert info.eod_id == ref.token_to_id("<|end_of_text|>") and not info.is_gpt2
    docs = [*valid_tricky_docs(), "special text <|end_of_text|> stays text"]
    data = write_jsonl(tmp_path / "d.jsonl", text_records(docs))
    summary = run_preprocess(tmp_path / "hf", [data], tokenizer=str(path))
    assert summary["tokenizer"]["eod_id"] == info.eod_id
    ref.encode_special_tokens = True
    expected = [ref.encode(d, add_special_tokens=False).ids + [info.eod_id] for d in docs]
    assert read_docs(tmp_path / "hf_text_document") == expected
    assert info.eod_id not in expected[-1][:-1]  # special text inside a document is ordinary
    assert tok.load_tokenizer(f"{path}::<|begin_of_text|>").eod_id == ref.token_to_id(
        "<|begin_of_text|>"
    )
    with pytest.raises(tok.TokenizerError, match="::TOKEN"):
        tok.load_tokenizer(str(_hf_tokenizer_json(tmp_path / "noeod.json", eod="<pad>")))


def _indexed_recipe(tmp_path: Path, *overrides: str):
    return load_config(
        "tiny",
        ["data.kind=indexed", f"training.output_dir={tmp_path / 'run'}", *overrides],
    )


def _preprocessed(tmp_path: Path, name: str, n_docs: int, **options) -> str:
    data = write_jsonl(tmp_path / f"{name}.jsonl", text_records(pydoc_docs(n_docs)))
    run_preprocess(tmp_path / name, [data], **options)
    return str(tmp_path / f"{name}_text_document")


def test_recipe_refuses_data_of_another_vocabulary_or_mixed_tokenizers(toy_ranks, tmp_path):
    from megatron_qk.data.data_summary import check_data_tokenizer

    gpt2 = _preprocessed(tmp_path, "a", 20)
    assert check_data_tokenizer(_indexed_recipe(tmp_path, f"data.train_prefixes=[{gpt2}]")) == 50256
    ranks = write_tiktoken_file(tmp_path / "toy.tiktoken", toy_ranks)
    cl = _preprocessed(tmp_path, "b", 20, tokenizer=f"cl100k_base:{ranks}")
    with pytest.raises(ConfigError, match="model.vocab_size.*100277"):
        check_data_tokenizer(_indexed_recipe(tmp_path, f"data.train_prefixes=[{cl}]"))
    fine = _indexed_recipe(tmp_path, f"data.train_prefixes=[{cl}]", "model.vocab_size=100277")
    assert check_data_tokenizer(fine) == 100257
    r50k = _preprocessed(tmp_path, "c", 20, tokenizer=f"r50k_base:{ranks}")
    with pytest.raises(ConfigError, match="one tokenizer"):
        check_data_tokenizer(_indexed_recipe(tmp_path, f"data.train_prefixes=[{gpt2},{r50k}]"))


def test_blend_weights_are_checked():
    with pytest.raises(ConfigError, match="train_weights.*2 weights for 1"):
        load_config("tiny", ["data.train_prefixes=[a]", "data.train_weights=[1.0, 2.0]"])
    with pytest.raises(ConfigError, match="train_weights.*positive"):
        load_config("tiny", ["data.train_prefixes=[a, b]", "data.train_weights=[1.0, 0.0]"])


def _doc_sources(dataset, prefixes: list[str], n: int) -> list[int]:
    """Which prefix each of the first ``n`` samples came from (megatron's BlendedDataset index)."""
    return [int(dataset.dataset_index[i]) for i in range(n)]


def test_weighted_blend_follows_the_weights_and_the_data_seed(tmp_path, single_rank):
    from megatron_qk.training.data import build_datasets

    a = _preprocessed(tmp_path, "a", 40)
    b = _preprocessed(tmp_path, "b", 40)
    common = [f"data.train_prefixes=[{a},{b}]", "data.train_weights=[0.75, 0.25]"]

    def build(seed: int, cache: str):
        cfg = _indexed_recipe(
            tmp_path, *common, f"training.data_seed={seed}", f"data.cache_dir={tmp_path / cache}"
        )
        return build_datasets(cfg, planned_steps=25, output_dir=str(tmp_path / "run")).train

    first, again, other = build(1, "c1"), build(1, "c2"), build(2, "c3")
    n = 200
    sources = _doc_sources(first, [a, b], n)
    assert sources == _doc_sources(again, [a, b], n)  # deterministic under the data seed
    share = np.bincount(sources, minlength=2) / n
    assert share.tolist() == pytest.approx([0.75, 0.25], abs=0.01)  # megatron's greedy blend
    for i in range(0, n, 37):
        assert np.array_equal(first[i]["tokens"], again[i]["tokens"])
    assert any(
        not np.array_equal(first[i]["tokens"], other[i]["tokens"]) for i in range(20)
    )  # another data seed draws other samples


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_exported_tokenizer_of_another_encoding_encodes_like_ours(name, toy_ranks, tmp_path):
    from transformers import AutoTokenizer

    from megatron_qk.export.hf_tokenizer import PROBE_TEXT, write_hf_tokenizer

    info = tok.load_tokenizer(f"{name}:{write_tiktoken_file(tmp_path / 't.tiktoken', toy_ranks)}")
    write_hf_tokenizer(tmp_path / "hf", info, model_max_length=64)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [PROBE_TEXT, *valid_tricky_docs()]:
        assert hf(text)["input_ids"] == info.encoding.encode_ordinary(text)
    assert hf.eos_token_id == EOD[name]


def test_exported_hf_tokenizer_json_encodes_like_ours(tmp_path):
    from transformers import AutoTokenizer

    from megatron_qk.export.hf_tokenizer import write_hf_tokenizer

    info = tok.load_tokenizer(str(_hf_tokenizer_json(tmp_path / "tokenizer.json")))
    write_hf_tokenizer(tmp_path / "hf", info, model_max_length=64)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [*valid_tricky_docs(), "x <|end_of_text|> y"]:
        assert hf(text)["input_ids"] == info.encoding.encode_ordinary(text)
    assert hf.eos_token_id == info.eod_id


def test_eval_adapter_uses_the_tokenizers_own_end_of_text(toy_ranks, tmp_path):
    import torch

    from megatron_qk.evaluation.adapter import MegatronLM
    from megatron_qk.training.restore import LoadedCheckpoint

    info = tok.load_tokenizer(f"cl100k_base:{write_tiktoken_file(tmp_path / 't', toy_ranks)}")
    cfg = load_config("tiny", ["model.vocab_size=100277"])
    loaded = LoadedCheckpoint(cfg, torch.nn.Identity(), 0, tmp_path, tmp_path, torch.device("cpu"))
    assert MegatronLM.from_checkpoint(loaded, encoding=info.encoding).eot_token_id == 100257
