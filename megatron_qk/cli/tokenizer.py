"""``megatron-qk tokenizer``: obtain, verify and export the GPT-2 BPE ranks for offline use.

Subcommands:

* ``fetch [--source pypi|vendored] [--cache-dir DIR] [--output FILE]``: obtain the ranks (from the
  hash-pinned ``openai-whisper`` sdist on PyPI, fetched without pip or any build step, or the copy
  shipped with megatron_qk), verify
  them, and seed the tiktoken cache so ``tiktoken.get_encoding("gpt2")`` works offline.
* ``verify [FILE]``: check a rank file (default: the vendored one) and, when the tiktoken cache
  is seeded, that ``get_encoding("gpt2")`` agrees with it.
* ``export --out DIR``: write ``gpt2.tiktoken``, ``encoder.json`` and ``vocab.bpe`` (for
  Megatron-LM's ``--vocab-file/--merge-file`` or HF tokenizers).
* ``path``: print the path of the vendored rank file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megatron_qk.data import tokenizer as tok
from megatron_qk.data import tokenizer_files as files
from megatron_qk.data.tokenizer import TokenizerError

logger = logging.getLogger(__name__)

# Public GPT-2 ids (tiktoken's tests/test_encoding.py and widely quoted examples).
KNOWN_IDS: dict[str, list[int]] = {
    "hello world": [31373, 995],
    "Hello world": [15496, 995],
    "Hello, world!": [15496, 11, 995, 0],
    "00000000": [8269],
    "0000000000000000": [25645],
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``tokenizer`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    sub.required = True

    fetch = sub.add_parser("fetch", help="obtain + verify the GPT-2 ranks, seed the tiktoken cache")
    fetch.add_argument(
        "--source",
        choices=("pypi", "vendored"),
        default="pypi",
        help="pypi: download the hash-pinned openai-whisper sdist from the package index "
        "(PIP_INDEX_URL or PyPI; no pip, no build step) (default); "
        "vendored: the copy shipped in megatron_qk/data/assets (no network)",
    )
    fetch.add_argument(
        "--cache-dir",
        default=None,
        help="tiktoken cache directory to seed (default: $TIKTOKEN_CACHE_DIR, else "
        "$DATA_GYM_CACHE_DIR, else tiktoken's default <tmp>/data-gym-cache)",
    )
    fetch.add_argument("--no-seed", action="store_true", help="do not write the tiktoken cache")
    fetch.add_argument("--output", default=None, help="also write the rank file here")
    fetch.add_argument("--download-dir", default=None, help="keep the downloaded sdist here")

    verify = sub.add_parser("verify", help="check a rank file and the tiktoken cache")
    verify.add_argument("file", nargs="?", default=None, help="rank file (default: vendored)")

    export = sub.add_parser("export", help="write gpt2.tiktoken, encoder.json, vocab.bpe")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--tokenizer", default=None, help="GPT-2 rank file (default: vendored)")

    sub.add_parser("path", help="print the vendored rank file's path")


def _cmd_fetch(args: argparse.Namespace) -> int:
    if args.source == "pypi":
        data = files.fetch_ranks_from_pypi(args.download_dir)
        print(f"obtained GPT-2 ranks from PyPI {files.WHISPER_SDIST} (sdist sha256 verified)")
    else:
        data = tok.read_rank_bytes(tok.VENDORED_RANKS)
        tok.verify_gpt2_ranks(data, str(tok.VENDORED_RANKS))
        print(f"using vendored GPT-2 ranks {tok.VENDORED_RANKS}")
    print(f"rank file sha256 {tok.sha256_hex(data)} == tiktoken's r50k_base hash")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        print(f"wrote {out}")
    if not args.no_seed:
        cache_dir = Path(args.cache_dir) if args.cache_dir else files.default_tiktoken_cache_dir()
        seeded = files.seed_tiktoken_cache(cache_dir, data)
        for url, path in seeded.items():
            print(f"seeded {path}  ({url.rsplit('/', 1)[-1]})")
        print(f'export TIKTOKEN_CACHE_DIR="{cache_dir.resolve()}"  # for tiktoken.get_encoding')
    return 0


def _check_known_ids(encoding) -> list[str]:
    errors = []
    for text, ids in KNOWN_IDS.items():
        got = encoding.encode_ordinary(text)
        if got != ids:
            errors.append(f"{text!r}: expected {ids}, got {got}")
    return errors


def _cmd_verify(args: argparse.Namespace) -> int:
    import os

    path = Path(args.file) if args.file else tok.VENDORED_RANKS
    enc = tok.load_gpt2_encoding(path)
    print(f"OK   {path}: sha256 {tok.GPT2_RANKS_SHA256}")
    errors = _check_known_ids(enc)
    print("OK   known public GPT-2 ids" if not errors else "FAIL " + "; ".join(errors))
    try:
        cache_dir = files.default_tiktoken_cache_dir()
    except tok.TokenizerError as e:
        print(f"SKIP tiktoken cache: {e}")
        return 1 if errors else 0
    urls = (files.VOCAB_BPE_URL, files.ENCODER_JSON_URL)
    needed = [cache_dir / files.tiktoken_cache_key(url) for url in urls]
    if not all(p.exists() for p in needed):
        print(f"SKIP tiktoken cache {cache_dir} not seeded (run `megatron-qk tokenizer fetch`)")
        return 1 if errors else 0
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache_dir))
    import tiktoken

    ref = tiktoken.get_encoding("gpt2")
    same = ref._mergeable_ranks == enc._mergeable_ranks and ref._pat_str == enc._pat_str
    same = same and ref._special_tokens == enc._special_tokens
    if same:
        print(f'OK   tiktoken.get_encoding("gpt2") from {cache_dir} equals the rank file')
    else:
        errors.append("tiktoken gpt2 differs")
        print(f'FAIL tiktoken.get_encoding("gpt2") from {cache_dir} differs from the rank file')
    return 1 if errors else 0


def _cmd_export(args: argparse.Namespace) -> int:
    path = Path(args.tokenizer) if args.tokenizer else tok.VENDORED_RANKS
    data = tok.read_rank_bytes(path)
    tok.verify_gpt2_ranks(data, str(path))
    for out in files.export_files(args.out, data).values():
        print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a ``tokenizer`` subcommand; returns the exit status (1 on a verification failure)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {"fetch": _cmd_fetch, "verify": _cmd_verify, "export": _cmd_export}
    try:
        if args.tokenizer_command == "path":
            from megatron_qk.data.tokenizer import VENDORED_RANKS

            print(VENDORED_RANKS)
            return 0
        return commands[args.tokenizer_command](args)
    except (TokenizerError, OSError) as e:
        print(f"megatron-qk tokenizer {args.tokenizer_command}: error: {e}", file=sys.stderr)
        return 1
