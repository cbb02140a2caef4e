"""Offline test data for the preprocessing and tokenizer tests (generated, never downloaded)."""

from __future__ import annotations

import base64
import gzip
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

# GPT-2's split pattern, written out here so reference encodings do not depend on megatron_qk.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

TRICKY_DOCS = [
    "Hello, world! A plain ASCII sentence.",
    "Unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية.",
    "Emoji 😀🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, skin tones 👍🏽, keycap 1️⃣.",
    "Long whitespace runs:" + " " * 300 + "end\t\t\t\ttabs" + "\u3000" * 5 + "x",
    "Empty lines inside\n\n\n\n\nthe document\r\n\r\nwith CRLF too\n",
    "   leading and trailing spaces   ",
    "Combining marks: e\u0301 a\u0308 n\u0303; zero width\u200bjoiner\u200d; RTL \u202eabc\u202c.",
    "Special-token text is ordinary text here: <|endoftext|> and <|fim_prefix|>.",
    "Numbers 0 00 000 0000 00000000 1234567890 3.14159 -42 1e10",
    "Code:\n    def f(x):\n        return x ** 2  # comment\n\n\tif True: pass\n",
    "Mixed " + "word " * 2000,  # a longer document
    "\n",  # a line break only: whitespace-only text is skipped as empty_text
    "Quotes: ‘single’ “double” «guillemets» — dashes – and … ellipsis.",
    "Math ∑∫∂√∞ ≠ ≤ ≥ and CJK extension B 𠀀𠀁 (astral plane).",
    "Control chars \x00\x01\x7f and a BOM \ufeff inside.",
]


def valid_tricky_docs() -> list[str]:
    """The tricky documents that are kept (non-empty after strip)."""
    return [d for d in TRICKY_DOCS if d.strip()]


def pydoc_docs(limit: int | None = None) -> list[str]:
    """Real English prose from the stdlib (``pydoc_data.topics``, PSF license, always present)."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    return docs[:limit] if limit else docs


def write_jsonl(path: Path, records: list[Any], gz: bool = False) -> Path:
    """Write records (dicts or raw ``bytes``/``str`` lines) as JSON lines."""
    lines = []
    for rec in records:
        if isinstance(rec, bytes):
            lines.append(rec)
        elif isinstance(rec, str):
            lines.append(rec.encode("utf-8"))
        else:
            lines.append(json.dumps(rec, ensure_ascii=False).encode("utf-8"))
    data = b"\n".join(lines) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def text_records(docs: list[str], start_id: int = 0, **extra: Any) -> list[dict[str, Any]]:
    """FineWeb-Edu-like records ``{"text", "id", ...}``."""
    return [{"text": t, "id": f"doc-{start_id + i}", **extra} for i, t in enumerate(docs)]


def write_parquet(path: Path, rows: dict[str, list[Any]], row_group_size: int = 16) -> Path:
    """Write columns to a parquet file with small row groups (exercises row-group seeking)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=row_group_size)
    return path


def fineweb_rows(docs: list[str], scores: list[int] | None = None) -> dict[str, list[Any]]:
    """Columns with FineWeb-Edu's schema for ``docs``."""
    n = len(docs)
    scores = scores if scores is not None else [i % 6 for i in range(n)]
    return {
        "text": docs,
        "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)],
        "file_path": ["s3://bucket/file.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": [0.9] * n,
        "token_count": [len(d.split()) for d in docs],
        "score": [float(s) + 0.25 for s in scores],
        "int_score": scores,
    }


def train_toy_bpe(text: str, num_merges: int = 60) -> dict[bytes, int]:
    """A tiny byte-level BPE trained on ``text``: 256 byte tokens + ``num_merges`` merges.

    Stands in for the GPT-2 ranks wherever a test must build its tokenizer offline from scratch.
    """
    ranks = {bytes([b]): b for b in range(256)}
    words = [
        [bytes([b]) for b in w.encode("utf-8")] for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text)
    ]
    while len(ranks) < 256 + num_merges:
        pairs = Counter(p for w in words for p in zip(w, w[1:]))
        pair = next((p for p, _ in pairs.most_common() if p[0] + p[1] not in ranks), None)
        if pair is None:
            break
        merged = pair[0] + pair[1]
        ranks[merged] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == pair:
                    w[i : i + 2] = [merged]
                i += 1
    return ranks


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> Path:
    """Write ranks in tiktoken's ``base64(token) rank`` format."""
    lines = [
        f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def megatron_reference(prefix: Path, token_lists: list[list[int]], dtype: Any) -> None:
    """Write ``prefix.{bin,idx}`` with megatron-core's own ``IndexedDatasetBuilder``."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for ids in token_lists:
        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
    builder.finalize(str(prefix) + ".idx")


def run_preprocess(prefix: Path, inputs: list[Any], **options: Any) -> dict[str, Any]:
    """Run the pipeline in-process with test-friendly defaults.

    2 thread workers (no process start-up per call; the CLI tests and the invariance test cover
    the default process backend) and no progress bar.
    """
    from megatron_qk.data.pipeline import PreprocessConfig, preprocess

    options.setdefault("workers", 2)
    options.setdefault("backend", "thread")
    options.setdefault("progress", False)
    on_event = options.pop("on_event", None)
    config = PreprocessConfig(output_prefix=str(prefix), inputs=[str(i) for i in inputs], **options)
    return preprocess(config, on_event=on_event)


def read_docs(prefix: str | Path) -> list[list[int]]:
    """Documents of an indexed dataset, read with megatron-core's ``IndexedDataset``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def same_files(a: str | Path, b: str | Path) -> bool:
    """Byte equality of ``a.{bin,idx}`` and ``b.{bin,idx}``."""
    return all(
        Path(f"{a}.{ext}").read_bytes() == Path(f"{b}.{ext}").read_bytes() for ext in ("bin", "idx")
    )


def read_docs_numpy(prefix: str | Path) -> list[list[int]]:
    """Documents of a uint16 indexed dataset parsed with numpy alone (layout in DATA_NOTES §5)."""
    import numpy as np

    idx = Path(f"{prefix}.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00" and idx[17] == 8  # magic, uint16
    count = int.from_bytes(idx[18:26], "little")
    lengths = np.frombuffer(idx[34 : 34 + 4 * count], dtype=np.int32)
    tokens = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    assert bounds[-1] == len(tokens)
    return [tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
