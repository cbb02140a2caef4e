"""Obtain, convert and install the GPT-2 rank file: PyPI fetch, data-gym files, tiktoken cache.

* :func:`fetch_ranks_from_pypi` downloads the hash-pinned ``openai-whisper`` sdist from the
  package index (a source reachable from clusters that can only reach a PyPI mirror), without pip
  or any build step, and extracts ``whisper/assets/gpt2.tiktoken``, verifying both hashes.
* :func:`data_gym_files` rebuilds OpenAI's original ``encoder.json`` / ``vocab.bpe`` from the ranks,
  byte for byte (their sha256 equal tiktoken's expected hashes). Megatron-LM's
  ``GPT2BPETokenizer`` and HF ``tokenizers`` read these.
* :func:`seed_tiktoken_cache` writes all three files under the names tiktoken looks up
  (``sha1(url)``), so ``tiktoken.get_encoding("gpt2")`` and ``("r50k_base")`` work offline.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from megatron_qk.data.tokenizer import (
    ENDOFTEXT,
    EOD_TOKEN_ID,
    GPT2_RANKS_SHA256,
    MAX_RANK_FILE_BYTES,
    TokenizerError,
    parse_ranks,
    sha256_hex,
    verify_gpt2_ranks,
)
from megatron_qk.rundir.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)

WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_PROJECT = "openai-whisper"
WHISPER_SDIST_FILE = "openai_whisper-20250625.tar.gz"
WHISPER_SDIST_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"
WHISPER_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"

# URLs and hashes exactly as in tiktoken_ext/openai_public.py; the cache key is sha1(url).
_BLOB = "https://openaipublic.blob.core.windows.net"
R50K_URL = f"{_BLOB}/encodings/r50k_base.tiktoken"
VOCAB_BPE_URL = f"{_BLOB}/gpt-2/encodings/main/vocab.bpe"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_URL = f"{_BLOB}/gpt-2/encodings/main/encoder.json"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by ``encoder.json``."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE-split ``token`` using only merges of rank below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_i, best_rank = i, rank
        if best_i < 0:
            return parts
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def data_gym_files(ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Rebuild GPT-2's ``encoder.json`` and ``vocab.bpe`` from the merge ranks.

    Every token of rank r >= 256 is the merge of the two parts that BPE with ranks < r yields.

    Args:
        ranks: the GPT-2 mergeable ranks.

    Returns:
        ``(encoder_json_bytes, vocab_bpe_bytes)``.

    Raises:
        TokenizerError: if a token does not split into exactly two parts (not a BPE rank table).
    """
    b2u = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    lines = ["#version: 0.2"]
    for token, rank in by_rank:
        if len(token) == 1:
            continue
        parts = _merge_parts(ranks, token, rank)
        if len(parts) != 2:
            raise TokenizerError(f"rank {rank} ({token!r}) is not a merge of two earlier tokens")
        lines.append(f"{to_str(parts[0])} {to_str(parts[1])}")
    vocab_bpe = ("\n".join(lines) + "\n").encode("utf-8")
    encoder = {to_str(token): rank for token, rank in by_rank}
    encoder[ENDOFTEXT] = EOD_TOKEN_ID
    return json.dumps(encoder).encode("utf-8"), vocab_bpe


def verified_data_gym_files(rank_bytes: bytes) -> tuple[bytes, bytes]:
    """:func:`data_gym_files` for the GPT-2 rank file, with tiktoken's hash checks on the result.

    Raises:
        TokenizerError: if the ranks are not GPT-2's or a rebuilt file's sha256 differs.
    """
    verify_gpt2_ranks(rank_bytes)
    encoder_json, vocab_bpe = data_gym_files(parse_ranks(rank_bytes))
    for name, data, expected in (
        ("encoder.json", encoder_json, ENCODER_JSON_SHA256),
        ("vocab.bpe", vocab_bpe, VOCAB_BPE_SHA256),
    ):
        if sha256_hex(data) != expected:
            raise TokenizerError(f"rebuilt {name} has sha256 {sha256_hex(data)}, not {expected}")
    return encoder_json, vocab_bpe


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data, mode=0o600)  # 0600 like the mkstemp files it replaces


def tiktoken_cache_key(url: str) -> str:
    """File name tiktoken uses for ``url`` in its cache directory."""
    return hashlib.sha1(url.encode()).hexdigest()


def default_tiktoken_cache_dir() -> Path:
    """The directory tiktoken 0.14 reads: ``$TIKTOKEN_CACHE_DIR``, ``$DATA_GYM_CACHE_DIR``, temp.

    Raises:
        TokenizerError: if ``TIKTOKEN_CACHE_DIR`` is set to ``""`` (caching disabled).
    """
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            if not os.environ[var]:
                raise TokenizerError(f"{var} is empty (tiktoken cache disabled); pass --cache-dir")
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def seed_tiktoken_cache(cache_dir: str | os.PathLike[str], rank_bytes: bytes) -> dict[str, Path]:
    """Install the GPT-2 files into a tiktoken cache directory (atomic writes, verified first).

    Args:
        cache_dir: the directory (``TIKTOKEN_CACHE_DIR``); created if needed.
        rank_bytes: the GPT-2 rank file contents.

    Returns:
        ``{url: cache_path}`` for r50k_base.tiktoken, vocab.bpe and encoder.json.

    Raises:
        TokenizerError: if the ranks are not GPT-2's.
        OSError: if the directory is not writable.
    """
    encoder_json, vocab_bpe = verified_data_gym_files(rank_bytes)
    cache = Path(cache_dir)
    out = {}
    for url, data in (
        (R50K_URL, rank_bytes),
        (VOCAB_BPE_URL, vocab_bpe),
        (ENCODER_JSON_URL, encoder_json),
    ):
        path = cache / tiktoken_cache_key(url)
        _atomic_write(path, data)
        out[url] = path
    return out


def export_files(out_dir: str | os.PathLike[str], rank_bytes: bytes) -> dict[str, Path]:
    """Write ``gpt2.tiktoken``, ``encoder.json`` and ``vocab.bpe`` into ``out_dir``.

    Returns:
        ``{file name: path}``.
    """
    encoder_json, vocab_bpe = verified_data_gym_files(rank_bytes)
    out = Path(out_dir)
    files = {"gpt2.tiktoken": rank_bytes, "encoder.json": encoder_json, "vocab.bpe": vocab_bpe}
    for name, data in files.items():
        _atomic_write(out / name, data)
    return {name: out / name for name in files}


def extract_ranks_from_sdist(sdist: str | os.PathLike[str] | IO[bytes]) -> bytes:
    """Read and verify ``whisper/assets/gpt2.tiktoken`` from an ``openai-whisper`` sdist.

    Raises:
        TokenizerError: if the archive is unreadable, lacks the file, or the file's hash is wrong.
    """
    try:
        opened = (
            tarfile.open(fileobj=sdist, mode="r:*")
            if hasattr(sdist, "read")
            else tarfile.open(sdist, "r:*")
        )
        with opened as tar:
            member = next(
                (m for m in tar.getmembers() if m.name.endswith("/" + WHISPER_RANKS_MEMBER)), None
            )
            if member is None or not member.isfile():
                raise TokenizerError(f"{sdist}: no {WHISPER_RANKS_MEMBER} in the archive")
            if member.size > MAX_RANK_FILE_BYTES:
                raise TokenizerError(f"{sdist}: {member.name} is over {MAX_RANK_FILE_BYTES} bytes")
            f = tar.extractfile(member)
            assert f is not None  # isfile() checked above
            data = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TokenizerError(f"cannot read sdist {sdist}: {e}") from e
    verify_gpt2_ranks(data, f"{sdist}:{member.name}")
    return data


def fetch_ranks_from_pypi(
    download_dir: str | os.PathLike[str] | None = None,
    index: str | None = None,
    opener: Callable[[str], Any] | None = None,
) -> bytes:
    """Download the hash-pinned ``openai-whisper`` sdist and return its GPT-2 ranks.

    The sdist is located on the package index's simple page (``index``, default
    ``PIP_INDEX_URL`` or PyPI, so a mirror works), downloaded with a size bound and accepted only
    when its sha256 is ``WHISPER_SDIST_SHA256``; the rank file inside is then checked against
    tiktoken's ``r50k_base`` hash. No pip, no build step: nothing downloaded is executed.

    Args:
        download_dir: also keep the verified sdist here.
        index: the simple index URL (default :func:`sdist_fetch.default_index_url`).
        opener: opens a URL for reading (injectable for tests; default ``urllib``).

    Returns:
        The verified rank file contents (sha256 ``GPT2_RANKS_SHA256``).

    Raises:
        TokenizerError: if the index or download fails or a hash does not match.
    """
    from megatron_qk.data import sdist_fetch

    kwargs = {"opener": opener} if opener is not None else {}
    index = index or sdist_fetch.default_index_url()
    url = sdist_fetch.find_file_url(index, WHISPER_PROJECT, WHISPER_SDIST_FILE, **kwargs)
    logger.info("downloading %s", url)
    sdist = sdist_fetch.download_verified(url, WHISPER_SDIST_SHA256, **kwargs)
    if download_dir is not None:
        Path(download_dir).mkdir(parents=True, exist_ok=True)
        _atomic_write(Path(download_dir) / WHISPER_SDIST_FILE, sdist)
    data = extract_ranks_from_sdist(io.BytesIO(sdist))
    assert sha256_hex(data) == GPT2_RANKS_SHA256
    return data
