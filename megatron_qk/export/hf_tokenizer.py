"""Hugging Face tokenizer files from our tiktoken encoding, built offline and checked on export.

A tiktoken encoding is byte-level BPE: ``tokenizer.json`` gets the same ranks as a BPE vocabulary,
the merges recovered from the ranks (each token of rank r is the BPE split, with ranks below r, of
its bytes into two parts), the encoding's own split regex followed by the byte-to-unicode mapping,
and its special tokens at their ids. ``ignore_merges`` makes a piece that is itself a token map to
that token, as tiktoken does.

Our preprocessing encodes special-token text (``<|endoftext|>`` inside a document) as ordinary
text, so the exported tokenizer sets ``split_special_tokens``; the ids then equal
``encoding.encode_ordinary``. :func:`write_hf_tokenizer` encodes a probe text with both and refuses
to write files that disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_qk.data.tokenizer import TokenizerInfo
from megatron_qk.data.tokenizer_files import _merge_parts, bytes_to_unicode

# Contractions, digits runs, punctuation, newlines, runs of spaces, non-Latin scripts, emoji,
# and special-token text: the places where split patterns differ.
PROBE_TEXT = (
    "Hello, world! It's 2026; we'll test   spaces\n\n\ttabs and 1234567 digits.\r\n"
    "Grüße, naïve café — 東京 タワー, Москва, عربى 🙂👍🏽 <|endoftext|> I'M DON'T x\u00a0y  \n"
)


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        parts = _merge_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"rank {rank} ({token!r}) is not a merge of two earlier tokens")
        merges.append((to_str(parts[0]), to_str(parts[1])))
    return vocab, merges


def build_hf_tokenizer(info: TokenizerInfo):
    """A ``tokenizers.Tokenizer`` encoding like ``info.encoding.encode_ordinary`` (tiktoken)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    enc = info.encoding
    vocab, merges = _vocab_and_merges(enc._mergeable_ranks)
    special = dict(enc._special_tokens)
    for text, token_id in special.items():
        vocab[text] = token_id
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(text, special=True, normalized=False) for text in sorted(special)]
    )
    return tokenizer


def write_hf_tokenizer(out_dir: Path, info: TokenizerInfo, model_max_length: int) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for ``info``.

    Raises:
        ValueError: the built tokenizer does not reproduce our ids on :data:`PROBE_TEXT`.
    """
    from megatron_qk.data.tokenizer_hf import HFTokenizerEncoding

    if isinstance(info.encoding, HFTokenizerEncoding):
        from tokenizers import Tokenizer

        # The user's own tokenizer.json is already the Hugging Face form: written unchanged.
        tokenizer = Tokenizer.from_file(str(info.encoding.path))
    else:
        tokenizer = build_hf_tokenizer(info)
    want = info.encoding.encode_ordinary(PROBE_TEXT)
    # split_special_tokens: special-token text is ordinary text, as in our preprocessing.
    tokenizer.encode_special_tokens = True
    got = tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids
    tokenizer.encode_special_tokens = False
    if got != want:
        raise ValueError(
            f"the tokenizer.json built from {info.source} encodes the probe text differently "
            f"from our tokenizer ({got[:20]} vs {want[:20]}); not writing it"
        )
    eod_text = info.encoding.decode([info.eod_id])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_json = out_dir / "tokenizer.json"
    tokenizer.save(str(tok_json))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eod_text,
        "eos_token": eod_text,
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    tok_config = out_dir / "tokenizer_config.json"
    tok_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [tok_json, tok_config]
