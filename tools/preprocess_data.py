#!/usr/bin/env python
"""Megatron-LM-style entry point for ``megatron-qk preprocess`` (same options, same outputs).

    python tools/preprocess_data.py --input data.jsonl --output-prefix data/fw --workers 8

writes ``data/fw_text_document.{bin,idx}`` like Megatron-LM's ``tools/preprocess_data.py`` with
``--append-eod`` and the GPT-2 tokenizer. A few Megatron-LM flags are accepted for habit's sake:
``--json-keys KEY`` (= ``--text-key``), ``--append-eod`` (always on),
``--tokenizer-type GPT2BPETokenizer`` and ``--vocab-file/--merge-file`` when they are GPT-2's files
(checked by sha256; other vocabularies need a ``.tiktoken`` file via ``--tokenizer``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_qk.cli import ArgumentParser, preprocess  # noqa: E402
from megatron_qk.data.tokenizer_files import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """``megatron-qk preprocess`` options plus Megatron-LM compatibility flags."""
    parser = ArgumentParser(description=preprocess.__doc__.splitlines()[0])
    preprocess.configure_parser(parser)
    compat = parser.add_argument_group("Megatron-LM compatibility")
    compat.add_argument("--json-keys", nargs=1, metavar="KEY", help="same as --text-key KEY")
    compat.add_argument("--append-eod", action="store_true", help="accepted; EOD is always added")
    compat.add_argument("--tokenizer-type", help="accepted if GPT2BPETokenizer")
    compat.add_argument("--vocab-file", help="accepted if it is GPT-2's encoder.json")
    compat.add_argument("--merge-file", help="accepted if it is GPT-2's vocab.bpe")
    compat.add_argument("--legacy-tokenizer", action="store_true", help="accepted; no effect")
    return parser


def _check_compat(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.json_keys:
        args.text_key = args.json_keys[0]
    if args.tokenizer_type and args.tokenizer_type != "GPT2BPETokenizer":
        parser.error(f"--tokenizer-type {args.tokenizer_type}: only GPT2BPETokenizer is supported")
    for option, path, expected in (
        ("--vocab-file", args.vocab_file, ENCODER_JSON_SHA256),
        ("--merge-file", args.merge_file, VOCAB_BPE_SHA256),
    ):
        if path and hashlib.sha256(Path(path).read_bytes()).hexdigest() != expected:
            parser.error(f"{option} {path} is not GPT-2's file; pass --tokenizer FILE.tiktoken")


def main(argv: list[str] | None = None) -> int:
    """Parse Megatron-LM-style arguments and run the preprocess command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_compat(args, parser)
    return preprocess.run(args)


if __name__ == "__main__":
    sys.exit(main())
