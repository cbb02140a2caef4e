"""GPT-2 BPE for megatron_qk, fully offline.

The GPT-2 merge ranks are identical to tiktoken's ``r50k_base.tiktoken`` (sha256
``306cd27f...d930``). megatron_qk ships them compressed in ``assets/gpt2.tiktoken.gz`` (from the
PyPI sdist ``openai-whisper==20250625``; see ``assets/LICENSE.gpt2-tiktoken.txt``) and checks that
hash on every load, so :func:`load_gpt2_encoding` never needs OpenAI's servers, a tiktoken cache or
a writable cache directory. The returned :class:`tiktoken.Encoding` gives exactly the ids of
``tiktoken.get_encoding("gpt2")``; ``megatron-qk tokenizer fetch`` re-obtains the ranks from PyPI
and seeds ``TIKTOKEN_CACHE_DIR`` for code that calls ``get_encoding`` itself.

Rank files are parsed here rather than with ``tiktoken.load.load_tiktoken_bpe``: that function
copies local files into ``TIKTOKEN_CACHE_DIR``, which fails when the directory is read-only.

Other tiktoken encodings (cl100k_base, o200k_base, ...) go through the same offline path with
their own split pattern, special tokens and end-of-document id (:func:`tiktoken_definition`), and
a Hugging Face ``tokenizer.json`` through :mod:`megatron_qk.data.tokenizer_hf`; see
:func:`load_tokenizer`.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import gzip
import hashlib
import logging
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tiktoken is imported lazily to keep ``megatron-qk --help`` fast.
    import tiktoken

logger = logging.getLogger(__name__)

EOD_TOKEN_ID = 50256
"""GPT-2's ``<|endoftext|>`` id, appended after every document."""

ENDOFTEXT = "<|endoftext|>"
GPT2_N_VOCAB = 50257
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
"""sha256 of the GPT-2 rank file; the ``expected_hash`` tiktoken uses for ``r50k_base``."""

# tiktoken_ext.openai_public.r50k_pat_str (equivalent to GPT-2's original pattern, faster).
R50K_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

ASSET_DIR = Path(__file__).resolve().parent / "assets"
VENDORED_RANKS = ASSET_DIR / "gpt2.tiktoken.gz"

# Megatron's DType.optimal_dtype: uint16 below this cardinality, int32 otherwise.
_UINT16_MAX_CARDINALITY = 65500


class TokenizerError(RuntimeError):
    """A rank file is missing, malformed or fails its checksum."""


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """A loaded tokenizer plus what the writer needs to know about it.

    Attributes:
        encoding: the tiktoken encoding.
        eod_id: id appended after each document.
        vocab_size: number of ids (ranks plus special tokens).
        source: where the ranks came from (``"gpt2 (vendored)"`` or a file path).
        ranks_sha256: sha256 of the uncompressed rank file (part of the resume key).
        is_gpt2: whether the ranks are exactly GPT-2's.
    """

    encoding: tiktoken.Encoding
    eod_id: int
    vocab_size: int
    source: str
    ranks_sha256: str
    is_gpt2: bool

    @property
    def dtype_name(self) -> str:
        """numpy dtype name for token storage (Megatron's ``DType.optimal_dtype``)."""
        return "uint16" if self.vocab_size < _UINT16_MAX_CARDINALITY else "int32"


# The largest tokenizer rank file read (after gunzip). Real rank files are a few MB (GPT-2 1.6 MB,
# o200k 3.6 MB); the bound turns a gzip bomb given as --tokenizer into an error, not an OOM.
MAX_RANK_FILE_BYTES = 64 * 1024 * 1024


def read_rank_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a ``.tiktoken`` rank file, transparently gunzipping ``*.gz``.

    Args:
        path: file path.

    Returns:
        The uncompressed file contents.

    Raises:
        TokenizerError: if the file cannot be read or decompressed.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f) if gzipped else f
            # Read one byte past the limit: a larger file (or a gzip bomb) is refused unread.
            data = stream.read(MAX_RANK_FILE_BYTES + 1)
        if len(data) > MAX_RANK_FILE_BYTES:
            raise TokenizerError(
                f"tokenizer rank file {path} is larger than {MAX_RANK_FILE_BYTES} bytes"
                f"{' once decompressed' if gzipped else ''} (the limit; GPT-2's is 1.6 MB)"
            )
        return data
    except FileNotFoundError as e:
        raise TokenizerError(f"tokenizer rank file not found: {path}") from e
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise TokenizerError(f"cannot read tokenizer rank file {path}: {e}") from e


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def verify_gpt2_ranks(data: bytes, source: str = "<bytes>") -> None:
    """Check that ``data`` is exactly the GPT-2 rank file.

    Raises:
        TokenizerError: naming ``source`` and both hashes when they differ.
    """
    actual = sha256_hex(data)
    if actual != GPT2_RANKS_SHA256:
        raise TokenizerError(
            f"{source}: sha256 {actual} is not the GPT-2 rank file's {GPT2_RANKS_SHA256}; "
            "the file is corrupt or not GPT-2's (re-obtain it with `megatron-qk tokenizer fetch`)"
        )


def parse_ranks(data: bytes, source: str = "<bytes>") -> dict[bytes, int]:
    """Parse ``base64(token) rank`` lines into tiktoken's ``mergeable_ranks`` mapping.

    Raises:
        TokenizerError: on a malformed line (naming ``source`` and the line number).
    """
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:  # also binascii.Error, a ValueError subclass
            raise TokenizerError(f"{source}:{lineno}: malformed rank line {line[:60]!r}") from e
    if not ranks:
        raise TokenizerError(f"{source}: no ranks found")
    return ranks


def encoding_from_ranks(
    ranks: dict[bytes, int], name: str = "gpt2", eod_id: int | None = None
) -> tiktoken.Encoding:
    """Build a tiktoken encoding with GPT-2's split pattern and ``<|endoftext|>``.

    Args:
        ranks: mergeable ranks (bytes -> id).
        name: encoding name.
        eod_id: id of ``<|endoftext|>``; defaults to ``len(ranks)`` (50256 for GPT-2).

    Returns:
        The encoding.
    """
    import tiktoken

    eod = len(ranks) if eod_id is None else eod_id
    n_vocab = max(max(ranks.values()), eod) + 1
    dense = n_vocab == len(ranks) + 1  # tiktoken asserts this when explicit_n_vocab is given
    return tiktoken.Encoding(
        name=name,
        pat_str=R50K_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: eod},
        explicit_n_vocab=n_vocab if dense else None,
    )


@functools.lru_cache(maxsize=2)
def _gpt2_encoding_from_verified(data: bytes) -> tiktoken.Encoding:
    # Keyed by the (verified) contents, so a file changed on disk is never served from the cache.
    return encoding_from_ranks(parse_ranks(data), name="gpt2", eod_id=EOD_TOKEN_ID)


def load_gpt2_encoding(path: str | os.PathLike[str] | None = None) -> tiktoken.Encoding:
    """Return the GPT-2 BPE encoding without any network access.

    The ids equal ``tiktoken.get_encoding("gpt2")``. The file is read and its sha256 checked on
    every call; only the parsing is memoized (by content).

    Args:
        path: a GPT-2 ``.tiktoken`` rank file (optionally gzipped). ``None`` uses the copy vendored
            in ``megatron_qk/data/assets``.

    Returns:
        A ``tiktoken.Encoding`` named ``"gpt2"`` with ``eot_token == EOD_TOKEN_ID``.

    Raises:
        TokenizerError: if the file is missing or is not the GPT-2 rank file.
    """
    source = str(path) if path is not None else str(VENDORED_RANKS)
    data = read_rank_bytes(source)
    verify_gpt2_ranks(data, source)
    return _gpt2_encoding_from_verified(data)


# tiktoken's encodings whose rank files are plain ``.tiktoken`` files (``gpt2`` is ``r50k_base``).
TIKTOKEN_ENCODINGS = ("r50k_base", "p50k_base", "cl100k_base", "o200k_base")


@functools.cache
def tiktoken_definition(name: str) -> tuple[str, dict[str, int], str]:
    """``(split pattern, special tokens, rank-file sha256)`` of one of tiktoken's encodings.

    tiktoken keeps these inside its encoding constructors, which also download the ranks; the
    constructor runs here with its rank loader replaced by one that records the expected hash and
    returns nothing, so no network or cache is touched and the values are tiktoken's own.

    Raises:
        TokenizerError: ``name`` is not in :data:`TIKTOKEN_ENCODINGS`.
    """
    from unittest import mock

    from tiktoken_ext import openai_public

    name = "r50k_base" if name == "gpt2" else name
    if name not in TIKTOKEN_ENCODINGS:
        raise TokenizerError(
            f"unknown tiktoken encoding {name!r}; choose from {', '.join(TIKTOKEN_ENCODINGS)}"
        )
    hashes: list[str] = []

    def record(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        hashes.append(expected_hash or "")
        return {}

    with mock.patch.object(openai_public, "load_tiktoken_bpe", record):
        spec = openai_public.ENCODING_CONSTRUCTORS[name]()
    return spec["pat_str"], dict(spec["special_tokens"]), hashes[0]


def _known_encoding_of(digest: str) -> str | None:
    for name in TIKTOKEN_ENCODINGS:
        if tiktoken_definition(name)[2] == digest:
            return name
    return None


def _named_encoding(name: str, data: bytes, source: str) -> TokenizerInfo:
    """The tiktoken encoding ``name`` (its split pattern, special tokens and EOD) on ``data``."""
    import tiktoken

    pat_str, special, expected = tiktoken_definition(name)
    digest = sha256_hex(data)
    if digest == GPT2_RANKS_SHA256:
        enc = _gpt2_encoding_from_verified(data)
        return TokenizerInfo(enc, EOD_TOKEN_ID, GPT2_N_VOCAB, source, digest, is_gpt2=True)
    ranks = parse_ranks(data, source)
    if digest != expected:
        logger.warning(
            "%s is not tiktoken's %s rank file (sha256 %s); using %s's split pattern and special "
            "tokens with these ranks",
            source,
            name,
            digest,
            name,
        )
    used = set(ranks.values())
    clash = sorted(t for t, i in special.items() if i in used)
    if clash:
        raise TokenizerError(
            f"{source}: {name}'s special tokens {clash} have ids that are ranks in this file; "
            f"these ranks do not belong to {name}"
        )
    n_vocab = max(max(used), max(special.values())) + 1
    dense = n_vocab == len(ranks) + len(special)  # tiktoken asserts this when given n_vocab
    enc = tiktoken.Encoding(
        name=name,
        pat_str=pat_str,
        mergeable_ranks=ranks,
        special_tokens=special,
        explicit_n_vocab=n_vocab if dense else None,
    )
    return TokenizerInfo(enc, special[ENDOFTEXT], n_vocab, source, digest, is_gpt2=False)


def load_tokenizer(spec: str = "gpt2") -> TokenizerInfo:
    """Load the tokenizer named by the CLI's ``--tokenizer`` value.

    Args:
        spec: one of

            * ``"gpt2"``: the vendored GPT-2 ranks;
            * a ``.tiktoken`` rank file (optionally gzipped) of one of tiktoken's encodings
              (:data:`TIKTOKEN_ENCODINGS`), recognised by its sha256 and loaded with that
              encoding's split pattern, special tokens and ``<|endoftext|>`` id;
            * ``NAME:FILE``: ranks in ``FILE`` with encoding ``NAME``'s split pattern and special
              tokens (for ranks of your own; a warning when ``FILE`` is not ``NAME``'s file);
            * a Hugging Face ``tokenizer.json`` (``FILE.json``, or ``FILE.json::EOD_TOKEN`` to
              name the end-of-document token), see :mod:`megatron_qk.data.tokenizer_hf`.

            A rank file that is none of tiktoken's and has no ``NAME:`` is refused: its split
            pattern and end-of-document id cannot be known.

    Returns:
        The tokenizer and its properties.

    Raises:
        TokenizerError: if the file is missing, malformed or of an unknown encoding.
    """
    if spec == "gpt2":
        data = read_rank_bytes(VENDORED_RANKS)
        digest = sha256_hex(data)
        if digest != GPT2_RANKS_SHA256:
            verify_gpt2_ranks(data, str(VENDORED_RANKS))  # raises: the vendored asset was modified
        enc = _gpt2_encoding_from_verified(data)
        return TokenizerInfo(enc, EOD_TOKEN_ID, GPT2_N_VOCAB, "gpt2 (vendored)", digest, True)
    file_part = spec.split("::", 1)[0]
    if file_part.endswith(".json"):
        from megatron_qk.data.tokenizer_hf import load_hf_tokenizer

        return load_hf_tokenizer(spec)
    name, sep, rest = spec.partition(":")
    if sep and (name in TIKTOKEN_ENCODINGS or name == "gpt2"):
        path = str(Path(rest).expanduser().resolve())
        return _named_encoding(name, read_rank_bytes(path), path)
    path = str(Path(spec).expanduser().resolve())
    data = read_rank_bytes(path)
    known = _known_encoding_of(sha256_hex(data))
    if known is None:
        raise TokenizerError(
            f"{path} (sha256 {sha256_hex(data)}) is not one of tiktoken's rank files "
            f"({', '.join(TIKTOKEN_ENCODINGS)}), so its split pattern and end-of-document id are "
            "unknown; give them with NAME:FILE, e.g. --tokenizer cl100k_base:" + spec
        )
    return _named_encoding(known, data, path)
