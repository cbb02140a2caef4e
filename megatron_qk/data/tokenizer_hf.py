"""A Hugging Face ``tokenizer.json`` (e.g. a Llama-3 tokenizer a user supplies) behind the small
tiktoken interface the preprocessing, evaluation and export use.

The file is read with the ``tokenizers`` library (no network). Like our tiktoken path, documents
are encoded without special tokens: special-token text inside a document is ordinary text
(``encode_special_tokens``), no BOS/EOS is added, and the end-of-document id is appended by the
pipeline. The end-of-document token is named with ``FILE.json::TOKEN`` or found among the
file's special tokens (:data:`EOD_CANDIDATES`, first match).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from megatron_qk.data.tokenizer import TokenizerError, TokenizerInfo

# End-of-document tokens of common tokenizers, in order of preference.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class HFTokenizerEncoding:
    """The subset of ``tiktoken.Encoding`` used by megatron-qk, on a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer, name: str, eot_token: int, path: Path):
        self._tokenizer = tokenizer
        self._tokenizer.encode_special_tokens = True  # special-token text is ordinary text
        self.name = name
        self.eot_token = eot_token
        self.path = path
        self.n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens or BOS/EOS."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_to_numpy(self, text: str, disallowed_special=()) -> np.ndarray:
        """:meth:`encode_ordinary` as a ``uint32`` array (tiktoken's signature)."""
        return np.asarray(self.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens included)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def __getstate__(self) -> dict:
        # Worker processes receive the path and reload (tokenizers objects pickle as JSON anyway).
        return {"name": self.name, "eot_token": self.eot_token, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.__init__(Tokenizer.from_file(str(state["path"])), **state)


def load_hf_tokenizer(spec: str) -> TokenizerInfo:
    """Load ``FILE.json`` or ``FILE.json::EOD_TOKEN``.

    Raises:
        TokenizerError: missing or unreadable file, or no end-of-document token.
    """
    from tokenizers import Tokenizer

    file_part, _, eod_text = spec.partition("::")
    path = Path(file_part).expanduser().resolve()
    try:
        data = path.read_bytes()
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except FileNotFoundError as e:
        raise TokenizerError(f"tokenizer file not found: {path}") from e
    except (OSError, UnicodeDecodeError, Exception) as e:  # tokenizers raises plain Exception
        raise TokenizerError(f"cannot read Hugging Face tokenizer {path}: {e}") from e
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    if eod_text:
        eod_id = tokenizer.token_to_id(eod_text)
        if eod_id is None:
            raise TokenizerError(f"{path}: end-of-document token {eod_text!r} is not in the file")
    else:
        found = [t for t in EOD_CANDIDATES if t in special]
        if not found:
            raise TokenizerError(
                f"{path}: none of {list(EOD_CANDIDATES)} is a special token; name the "
                f"end-of-document token with {file_part}::TOKEN"
            )
        eod_text = found[0]
        eod_id = tokenizer.token_to_id(eod_text)
    enc = HFTokenizerEncoding(tokenizer, path.name, eod_id, path)
    digest = hashlib.sha256(data).hexdigest()
    source = f"{path}::{eod_text}"
    return TokenizerInfo(enc, eod_id, enc.n_vocab, source, digest, is_gpt2=False)
