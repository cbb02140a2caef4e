"""Throughput of ``megatron-qk preprocess`` vs raw tiktoken and Megatron-LM's preprocess_data.py.

Prints one JSON object. Three measurements on the same jsonl corpus and the same worker count:

* ``ceiling``: raw tiktoken on the documents already in memory (no I/O, no JSON, no output),
  ``workers`` threads or forked processes each encoding a contiguous, byte-balanced slice; the
  best of threads x ``encode_ordinary``/``encode_to_numpy`` and processes (the practical ceiling).
* ``ours``: ``python -m megatron_qk.cli preprocess`` as a subprocess (jsonl -> .bin/.idx).
* ``megatron_lm``: Megatron-LM's ``tools/preprocess_data.py`` from a checkout given with
  ``--megatron-lm`` (GPT2BPETokenizer, ``--legacy-tokenizer``, encoder.json/vocab.bpe rebuilt from
  the verified GPT-2 ranks, ``--append-eod``). Its code is run, never copied.

Each tool is timed end to end (``wall``) and with its start-up cost subtracted (``steady``: wall
minus the wall time of the same command on a one-document file), median of ``--runs`` runs,
interleaved so machine noise hits all of them alike. The corpus defaults to real English text from
Debian packages (``dict-foldoc``, ``python3.11-doc``; via ``apt-get download``, not committed),
falling back to the stdlib's ``pydoc_data.topics``; ``--repeat`` concatenates it to lengthen runs.

Example::

    python benchmarks/preprocess.py --workers 2 --megatron-lm /tmp/mlm \\
        --megatron-lm-pythonpath /tmp/mlm_deps
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def _foldoc_docs(root: Path) -> list[str]:
    """FOLDOC entries (dictzip = gzip; index offsets are positional base-64 numbers)."""
    data = gzip.open(root / "usr/share/dictd/foldoc.dict.dz", "rb").read()
    seen, docs = set(), []
    for line in (root / "usr/share/dictd/foldoc.index").read_text(encoding="utf-8").splitlines():
        head, off, length = line.split("\t")
        if head.startswith("00-database") or (off, length) in seen:
            continue
        seen.add((off, length))
        start = _b64_number(off)
        entry = textwrap.dedent(data[start : start + _b64_number(length)].decode("utf-8"))
        entry = re.sub(r"\{([^{}]*)\}", r"\1", entry)
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", entry) if p.strip()]
        docs.append("\n\n".join(paras))
    return docs


def _python_doc_docs(root: Path) -> list[str]:
    docs = []
    # python3.11-doc/html is a symlink to python3.11/html: read each real directory once.
    for sources in sorted({p.resolve() for p in root.glob("usr/share/doc/python3*/html/_sources")}):
        for p in sorted(sources.rglob("*.rst.txt")):
            if p.relative_to(sources).parts[0] not in ("c-api", "distutils", "includes"):
                docs.append(p.read_text(encoding="utf-8"))
    return docs


def build_corpus(work: Path) -> tuple[list[str], str]:
    """Real English documents: Debian packages when apt works, else pydoc topics."""
    debs, root = work / "debs", work / "root"
    debs.mkdir(parents=True, exist_ok=True)
    docs: list[str] = []
    used = []
    for pkg, reader in (("dict-foldoc", _foldoc_docs), ("python3.11-doc", _python_doc_docs)):
        try:
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True, capture_output=True)
            for deb in debs.glob(f"{pkg}_*.deb"):
                subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
            docs += reader(root)
            used.append(pkg)
        except (OSError, subprocess.CalledProcessError):
            continue
    if not docs:
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)], "stdlib pydoc_data.topics"
    return docs, "debian " + " + ".join(used)


def _balanced_slices(docs: list[str], parts: int) -> list[list[str]]:
    """Contiguous slices of ``docs`` with about the same number of characters."""
    total = sum(map(len, docs))
    slices, start, acc = [], 0, 0
    for i, d in enumerate(docs):
        acc += len(d)
        if acc >= total * (len(slices) + 1) / parts and len(slices) < parts - 1:
            slices.append(docs[start : i + 1])
            start = i + 1
    slices.append(docs[start:])
    return slices


def _encode_all(enc, docs: list[str], method: str) -> int:
    if method == "encode_to_numpy":
        return sum(len(enc.encode_to_numpy(d, disallowed_special=())) for d in docs)
    return sum(len(enc.encode_ordinary(d)) for d in docs)


def ceiling_threads(docs: list[str], workers: int, method: str) -> float:
    """Raw tiktoken tokens/s: threads over contiguous byte-balanced slices, no I/O."""
    from megatron_qk.data.tokenizer import load_gpt2_encoding

    enc = load_gpt2_encoding()
    slices = _balanced_slices(docs, workers)
    counts = [0] * len(slices)

    def work(k: int) -> None:
        counts[k] = _encode_all(enc, slices[k], method)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(slices))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


_SLICES: list[list[str]] = []


def _ceiling_child(k: int, barrier, results) -> None:
    from megatron_qk.data.tokenizer import load_gpt2_encoding

    enc = load_gpt2_encoding()
    barrier.wait()
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    n = _encode_all(enc, _SLICES[k], "encode_ordinary")
    results.put((n, t0, time.perf_counter()))


def ceiling_processes(docs: list[str], workers: int) -> float:
    """Raw tiktoken tokens/s: forked processes, each with its slice already in memory."""
    import multiprocessing as mp

    _SLICES[:] = _balanced_slices(docs, workers)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_ceiling_child, args=(k, barrier, results)) for k in range(workers)]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(n for n, _, _ in out) / (max(t1 for *_, t1 in out) - min(t0 for _, t0, _ in out))


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of a command run from the repository root (it must succeed)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def _stats(tokens: int, walls: list[float], startups: list[float]) -> dict:
    wall, startup = statistics.median(walls), statistics.median(startups)
    return {
        "wall_seconds": round(wall, 3),
        "wall_seconds_all": [round(w, 3) for w in walls],
        "startup_seconds": round(startup, 3),
        "tokens_per_second_wall": round(tokens / wall),
        "tokens_per_second_steady": round(tokens / max(wall - startup, 1e-9)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", help="jsonl with a 'text' field (default: build one)")
    p.add_argument("--repeat", type=int, default=4, help="concatenate the corpus N times")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="timed runs per tool (median)")
    p.add_argument("--megatron-lm", help="checkout of NVIDIA/Megatron-LM (tag core_v0.16.1)")
    p.add_argument("--megatron-lm-pythonpath", default="", help="extra dirs for its imports")
    p.add_argument("--work-dir", help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mqk-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.corpus:
        lines = Path(args.corpus).read_text(encoding="utf-8").splitlines()
        docs, source = [json.loads(line)["text"] for line in lines if line.strip()], args.corpus
    else:
        docs, source = build_corpus(work)
    docs = [d for d in docs if d.strip()] * args.repeat
    corpus = work / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": d}) + "\n")
    one_doc = work / "one.jsonl"
    one_doc.write_text(json.dumps({"id": "0", "text": docs[0]}) + "\n")

    from megatron_qk.data.tokenizer import VENDORED_RANKS, load_gpt2_encoding, read_rank_bytes
    from megatron_qk.data.tokenizer_files import export_files

    tokens = sum(len(t) + 1 for t in load_gpt2_encoding().encode_ordinary_batch(docs))
    w = str(args.workers)

    def ours(inp: Path, prefix: str, *extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "megatron_qk.cli", "preprocess", "--input", str(inp)]
        return cmd + ["--output-prefix", str(work / prefix), "--workers", w, "--overwrite",
                      "--no-progress", *extra]  # fmt: skip

    mlm_env, vocab = None, None
    if args.megatron_lm:
        vocab = export_files(work / "vocab", read_rank_bytes(VENDORED_RANKS))
        extra = [args.megatron_lm, *filter(None, args.megatron_lm_pythonpath.split(os.pathsep))]
        mlm_env = {**os.environ, "PYTHONPATH": os.pathsep.join(extra)}

    def mlm(inp: Path, prefix: str) -> list[str]:
        assert vocab is not None
        return [
            sys.executable, str(Path(args.megatron_lm) / "tools" / "preprocess_data.py"),
            "--input", str(inp), "--output-prefix", str(work / prefix),
            "--tokenizer-type", "GPT2BPETokenizer", "--legacy-tokenizer",
            "--vocab-file", str(vocab["encoder.json"]), "--merge-file", str(vocab["vocab.bpe"]),
            "--append-eod", "--workers", w, "--log-interval", "1000000000",
        ]  # fmt: skip

    # name -> (full command, one-document command, environment)
    tools = {
        "ours": (ours(corpus, "ours"), ours(one_doc, "ours_one"), None),
        "ours_thread_backend": (
            ours(corpus, "ours_t", "--backend", "thread"),
            ours(one_doc, "ours_t_one", "--backend", "thread"),
            None,
        ),
    }
    if args.megatron_lm:
        tools["megatron_lm"] = (mlm(corpus, "mlm"), mlm(one_doc, "mlm_one"), mlm_env)
    walls: dict[str, list[float]] = {name: [] for name in tools}
    startups: dict[str, list[float]] = {name: [] for name in tools}
    ceilings: dict[str, list[float]] = {
        "threads_encode_ordinary": [],
        "threads_encode_to_numpy": [],
        "processes_encode_ordinary": [],
    }
    for run in range(args.runs):
        for method in ("encode_ordinary", "encode_to_numpy"):
            ceilings[f"threads_{method}"].append(ceiling_threads(docs, args.workers, method))
        ceilings["processes_encode_ordinary"].append(ceiling_processes(docs, args.workers))
        for name, (full, one, env) in tools.items():
            walls[name].append(timed(full, env))
            startups[name].append(timed(one, env))
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)

    summary = json.loads((work / "ours_summary.json").read_text())
    assert summary["tokens"] == tokens, (summary["tokens"], tokens)
    ceil = {f"{m}_tokens_per_second": round(statistics.median(v)) for m, v in ceilings.items()}
    ceil["tokens_per_second"] = max(ceil.values())
    stats = {name: _stats(tokens, walls[name], startups[name]) for name in tools}
    for name, (full, _, _) in tools.items():
        stats[name]["command"] = " ".join(full)
    stats["ours"]["tool_reported_tokens_per_second"] = summary["tokens_per_second"]
    prefixes = {"ours_thread_backend": "ours_t", "megatron_lm": "mlm"}
    for name, prefix in prefixes.items():
        if name in stats:  # same bytes as ours?
            stats[name]["identical_output"] = all(
                (work / f"ours_text_document.{e}").read_bytes()
                == (work / f"{prefix}_text_document.{e}").read_bytes()
                for e in ("bin", "idx")
            )
    out = {
        "benchmark": "preprocess",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "corpus": {
            "source": source,
            "repeat": args.repeat,
            "documents": len(docs),
            "bytes": corpus.stat().st_size,
            "tokens": tokens,
        },
        "workers": args.workers,
        "runs": args.runs,
        "ceiling": ceil,
        **stats,
    }
    top = ceil["tokens_per_second"]
    ratios = {
        "ours_steady_vs_ceiling": stats["ours"]["tokens_per_second_steady"] / top,
        "ours_wall_vs_ceiling": stats["ours"]["tokens_per_second_wall"] / top,
        "ours_thread_backend_steady_vs_ceiling": (
            stats["ours_thread_backend"]["tokens_per_second_steady"] / top
        ),
    }
    if args.megatron_lm:
        for kind in ("wall", "steady"):
            key = f"tokens_per_second_{kind}"
            ratios[f"ours_vs_megatron_lm_{kind}"] = stats["ours"][key] / stats["megatron_lm"][key]
    else:
        out["megatron_lm"] = None
        out["megatron_lm_reason"] = "no --megatron-lm checkout given"
    out["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    out["targets_met"] = {
        "ours >= 0.8 x ceiling": ratios["ours_steady_vs_ceiling"] >= 0.8,
        "ours >= 1.5 x megatron_lm": (
            min(ratios["ours_vs_megatron_lm_wall"], ratios["ours_vs_megatron_lm_steady"]) >= 1.5
            if args.megatron_lm
            else None
        ),
    }
    print(json.dumps(out, indent=2))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
