"""N shards + ``merge-datasets`` vs one ``preprocess`` job on the same corpus; prints one JSON.

The corpus is the stdlib's ``pydoc_data.topics`` prose, repeated ``--repeat`` times and cut into
``--files`` jsonl files (a shard is a run of whole files). Measured, each as a subprocess of the
real CLI:

* ``one_job``: ``preprocess --workers W`` on every file (wall seconds).
* ``shards``: N ``preprocess --shard I/N --workers W/N`` processes started together (wall seconds
  until the last one ends), then ``merge-datasets`` (wall seconds of the process, and the merge's
  own seconds and bytes/s from its summary: reading the shard indexes, copying the ``.bin`` data
  through megatron-core's builder, writing the ``.idx``).
  ``merge_import_s`` is the command's import of megatron-core (torch), timed apart.
* ``copy_ceiling``: the same ``.bin`` bytes copied with ``shutil.copyfileobj`` (this disk's
  sequential copy rate, what an I/O-bound merge can reach).

The merged ``.bin``/``.idx`` files (train and valid) are compared byte for byte with the one job's.

    python benchmarks/preprocess_shards.py --shards 2 --workers 2 --repeat 20 --files 8
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUTPUTS = ("text_document", "valid_text_document")


def _corpus(directory: Path, repeat: int, files: int) -> list[Path]:
    from pydoc_data.topics import topics

    # Each copy made distinct, so the validation split (by text hash) gets documents too.
    docs = [f"({r}) {topics[k]}" for r in range(repeat) for k in sorted(topics)]
    paths = []
    per_file = -(-len(docs) // files)
    for k in range(files):
        path = directory / f"part{k:03d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i, text in enumerate(docs[k * per_file : (k + 1) * per_file]):
                f.write(json.dumps({"text": text, "id": f"{k}-{i}"}) + "\n")
        paths.append(path)
    return paths


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_qk.cli", *args]


def _preprocess(inputs: list[Path], prefix: Path, workers: int, *extra: str) -> list[str]:
    return _cli(
        "preprocess", "--input", *map(str, inputs), "--output-prefix", str(prefix),
        "--workers", str(workers), "--valid-fraction", "0.01", "--no-progress", *extra,
    )  # fmt: skip


def _run_all(commands: list[list[str]]) -> float:
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {err.decode()[-2000:]}")
    return time.perf_counter() - t0


def _copy_rate(sources: list[str], target: Path) -> float:
    t0 = time.perf_counter()
    with open(target, "wb") as out:
        for src in sources:
            with open(src, "rb") as f:
                shutil.copyfileobj(f, out)
        out.flush()
        os.fsync(out.fileno())
    return sum(os.path.getsize(s) for s in sources) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the one job (all shards)")
    parser.add_argument("--repeat", type=int, default=20, help="corpus repetitions")
    parser.add_argument("--files", type=int, default=8, help="input jsonl files")
    parser.add_argument("--work-dir", help="keep the files here (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mqk_shards_"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = _corpus(work, args.repeat, args.files)
    one = work / "one"
    one_s = _run_all([_preprocess(inputs, one, args.workers)])
    per_shard = max(1, args.workers // args.shards)
    prefixes = [work / f"shard{i}" for i in range(args.shards)]
    shard_s = _run_all(
        [
            _preprocess(inputs, p, per_shard, "--shard", f"{i}/{args.shards}")
            for i, p in enumerate(prefixes)
        ]
    )
    merged = work / "merged"
    merge_s = _run_all(
        [_cli("merge-datasets", *map(str, prefixes), "--output-prefix", str(merged))]
    )
    summary = json.loads(Path(f"{merged}_summary.json").read_text())
    bins = [f"{p}_text_document.bin" for p in prefixes]
    identical = all(
        filecmp.cmp(f"{merged}_{o}.{e}", f"{one}_{o}.{e}", shallow=False)
        if os.path.exists(f"{one}_{o}.{e}")
        else not os.path.exists(f"{merged}_{o}.{e}")
        for o in OUTPUTS
        for e in ("bin", "idx")
    )
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average": os.getloadavg(),
        "corpus": {
            "files": args.files,
            "documents": summary["documents"],
            "tokens": summary["tokens"],
        },
        "one_job": {"workers": args.workers, "wall_s": round(one_s, 3)},
        "shards": {
            "count": args.shards,
            "workers_each": per_shard,
            "wall_s": round(shard_s, 3),
            "merge_process_wall_s": round(merge_s, 3),
            "merge_s": summary["merge_seconds"],
            "merge_import_s": summary["import_seconds"],
            "merge_gb_per_s": round(summary["merge_bytes_per_second"] / 1e9, 3),
            "total_wall_s": round(shard_s + merge_s, 3),
        },
        "merged_bytes": sum(
            os.path.getsize(f"{merged}_{o}.bin")
            for o in OUTPUTS
            if os.path.exists(f"{merged}_{o}.bin")
        ),
        "valid_documents": (summary["valid"] or {}).get("documents", 0),
        "copy_ceiling_gb_per_s": round(_copy_rate(bins, work / "copy.bin") / 1e9, 3),
        "byte_identical": identical,
    }
    print(json.dumps(result, indent=2))
    if not args.work_dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
