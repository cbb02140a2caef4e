"""Output format: round trip through megatron-core, byte identity with its builder, GPTDataset."""

from __future__ import annotations

import numpy as np
import pytest
import tiktoken
from data_fixtures import (
    GPT2_PATTERN,
    TRICKY_DOCS,
    megatron_reference,
    pydoc_docs,
    read_docs,
    run_preprocess,
    same_files,
    text_records,
    train_toy_bpe,
    valid_tricky_docs,
    write_jsonl,
    write_tiktoken_file,
)

from megatron_qk.data.indexed import write_indexed_dataset
from megatron_qk.data.tokenizer import EOD_TOKEN_ID, load_gpt2_encoding


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2_encoding()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tricky documents interleaved with real prose, as one jsonl file."""
    docs = []
    prose = pydoc_docs(40)
    for i, tricky in enumerate(TRICKY_DOCS):
        docs += [tricky, prose[i % len(prose)]]
    path = write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", text_records(docs))
    kept = [d for d in docs if d.strip()]
    return path, kept


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("num_docs", [0, 1, 257])
def test_writer_byte_identical_to_indexed_dataset_builder(tmp_path, dtype, num_docs):
    rng = np.random.default_rng(num_docs)
    docs = [
        rng.integers(0, 50257, size=int(rng.integers(1, 400))).tolist() for _ in range(num_docs)
    ]
    megatron_reference(tmp_path / "ref", docs, dtype)
    assert write_indexed_dataset(tmp_path / "ours", [np.array(d) for d in docs], dtype) == num_docs
    assert same_files(tmp_path / "ours", tmp_path / "ref")


def test_round_trip_gpt2_and_identity_with_megatron_builder(tmp_path, corpus, gpt2):
    path, kept = corpus
    summary = run_preprocess(tmp_path / "out", [path])
    expected = [gpt2.encode_ordinary(d) + [EOD_TOKEN_ID] for d in kept]

    prefix = tmp_path / "out_text_document"
    assert read_docs(prefix) == expected
    assert [gpt2.decode(ids[:-1]) for ids in read_docs(prefix)] == kept
    assert (prefix.with_suffix(".idx")).read_bytes()[17] == 8  # DType code of uint16
    megatron_reference(tmp_path / "ref", expected, np.uint16)
    assert same_files(prefix, tmp_path / "ref")
    assert summary["documents"] == len(kept)
    assert summary["tokens"] == sum(map(len, expected))
    assert summary["skipped"]["empty_text"] == 1  # the "\n" document
    assert summary["train"]["prefix"] == str(prefix) and summary["valid"] is None


def test_real_tiktoken_gpt2_ids_when_obtainable(tmp_path, corpus):
    """The vendored ranks seed tiktoken's cache, so tiktoken's own gpt2 is always obtainable."""
    from megatron_qk.data.tokenizer import VENDORED_RANKS, read_rank_bytes
    from megatron_qk.data.tokenizer_files import seed_tiktoken_cache

    path, kept = corpus
    seed_tiktoken_cache(tmp_path / "cache", read_rank_bytes(VENDORED_RANKS))
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
        mp.setattr(tiktoken.registry, "ENCODINGS", {})
        real = tiktoken.get_encoding("gpt2")
    finally:
        mp.undo()
    run_preprocess(tmp_path / "out", [path], workers=1)
    assert read_docs(tmp_path / "out_text_document") == [
        real.encode_ordinary(d) + [real.eot_token] for d in kept
    ]


def test_output_independent_of_workers_and_backend(tmp_path, corpus):
    path, _ = corpus
    run_preprocess(tmp_path / "w1", [path], workers=1, valid_fraction=0.2)
    variants = {
        "w2": {"workers": 2},
        "w3small": {"workers": 3, "chunk_bytes": 500},  # many chunks in flight, out-of-order done
        "p2": {"workers": 2, "backend": "process", "chunk_bytes": 5000},
    }
    for name, options in variants.items():
        run_preprocess(tmp_path / name, [path], valid_fraction=0.2, **options)
        for split in ("text_document", "valid_text_document"):
            assert same_files(tmp_path / f"{name}_{split}", tmp_path / f"w1_{split}"), (name, split)


def test_custom_offline_tokenizer_file(tmp_path):
    """A tokenizer built from scratch in the test (no GPT-2 ranks involved)."""
    ranks = train_toy_bpe(" ".join(pydoc_docs(8)), num_merges=50)
    rank_file = write_tiktoken_file(tmp_path / "toy.tiktoken", ranks)
    ref = tiktoken.Encoding("ref", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    docs = valid_tricky_docs()
    path = write_jsonl(tmp_path / "d.jsonl", text_records(docs))
    summary = run_preprocess(tmp_path / "toy", [path], tokenizer=f"r50k_base:{rank_file}")
    eod = 50256  # r50k_base's <|endoftext|>
    expected = [ref.encode_ordinary(d) + [eod] for d in docs]
    assert read_docs(tmp_path / "toy_text_document") == expected
    assert summary["tokenizer"]["eod_id"] == eod and summary["tokenizer"]["is_gpt2"] is False
    assert any(t >= 256 for ids in expected for t in ids[:-1])  # the merges were used


def test_gpt_dataset_reads_the_output(tmp_path, corpus):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    class Tokenizer:  # what GPTDataset reads from a tokenizer
        eod = EOD_TOKEN_ID
        pad = EOD_TOKEN_ID
        vocab_size = 50257
        unique_identifiers = {"class": "gpt2-tiktoken"}

    path, _ = corpus
    run_preprocess(tmp_path / "gpt", [path])
    prefix = str(tmp_path / "gpt_text_document")
    seq = 64
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=seq,
        blend=([prefix], None),
        split="100,0,0",
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        tokenizer=Tokenizer(),
        path_to_cache=str(tmp_path / "cache"),
        mid_level_dataset_surplus=0.005,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [30, None, None], lambda: True, config
    ).build()
    docs = read_docs(prefix)
    stream = np.concatenate([docs[d] for d in train.document_index])
    starts = np.concatenate([[0], np.cumsum([len(docs[d]) for d in train.document_index])])
    assert len(train) >= 30
    for i in range(30):
        sample = train[i]
        beg, offset = train.sample_index[train.shuffle_index[i]]
        window = stream[starts[beg] + offset :][: seq + 1]
        assert sample["tokens"].tolist() == window[:-1].tolist()
        assert sample["labels"].tolist() == window[1:].tolist()
