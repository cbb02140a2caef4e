"""How many tokenizer workers a preprocess run may start: CPUs this process may use, and work.

``--workers`` is a request. The pool never exceeds the CPUs the process may run on (its CPU
affinity, and the CPU quota of its cgroup, v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``, as a
container or a SLURM allocation sets them; ``os.cpu_count()`` counts the whole machine) nor the
number of batches the input can make (a worker without a batch is only start-up cost). A request
that is lowered is reported in one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from megatron_qk.data.readers import MAX_BATCH_RECORDS, HubDataset, InputFile, Source


def _mounts(proc_self: Path) -> list[tuple[str, str, str, set[str]]]:
    """``(root, mount point, fstype, super options)`` of the cgroup mounts in mountinfo."""
    out = []
    try:
        lines = (proc_self / "mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            out.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    return out


def _cgroup_paths(proc_self: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in the v1 ``cpu`` hierarchy."""
    v2 = v1 = None
    try:
        lines = (proc_self / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "cpu" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _directories(mount_point: str, root: str, path: str) -> list[Path]:
    """The cgroup's directory under ``mount_point`` and its ancestors up to the mount point."""
    rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    here = Path(mount_point) / ("" if rel == "." else rel)
    dirs = [here]
    while here != Path(mount_point) and here.parent != here:
        here = here.parent
        dirs.append(here)
    return dirs


def _read_quota(directory: Path, v2: bool) -> float | None:
    try:
        if v2:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
        return None if int(quota) <= 0 else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def cgroup_cpu_limit(proc_self: Path = Path("/proc/self")) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup and its ancestors; ``None`` if none."""
    v2_path, v1_path = _cgroup_paths(proc_self)
    limits = []
    for root, mount_point, fstype, options in _mounts(proc_self):
        if fstype == "cgroup2" and v2_path is not None:
            path, v2 = v2_path, True
        elif fstype == "cgroup" and "cpu" in options and v1_path is not None:
            path, v2 = v1_path, False
        else:
            continue
        for directory in _directories(mount_point, root, path):
            quota = _read_quota(directory, v2)
            if quota is not None:
                limits.append(quota)
    return min(limits) if limits else None


def usable_cpus(proc_self: Path = Path("/proc/self")) -> tuple[int, str]:
    """CPUs this process may use (affinity, capped by the cgroup quota rounded up), and how."""
    if hasattr(os, "sched_getaffinity"):
        affinity = len(os.sched_getaffinity(0))
        how = f"affinity {affinity}"
    else:
        affinity = os.cpu_count() or 1
        how = f"{affinity} CPUs"
    quota = cgroup_cpu_limit(proc_self)
    if quota is None:
        return affinity, how + ", no cgroup CPU quota"
    return max(1, min(affinity, math.ceil(quota))), how + f", cgroup CPU quota {quota:g}"


def batch_bound(sources: Sequence[Source], chunk_bytes: int) -> int | None:
    """At most how many raw batches the inputs make, or ``None`` when it cannot be known.

    A jsonl batch closes at ``chunk_bytes`` bytes or :data:`MAX_BATCH_RECORDS` lines of at least
    one byte, plus one last batch per file; a parquet batch holds at least one row. Compressed
    files and hub streams have no cheap bound.
    """
    total = 0
    for source in sources:
        if isinstance(source, HubDataset) or not isinstance(source, InputFile):
            return None
        if source.fmt == "jsonl":
            total += source.path.stat().st_size // min(chunk_bytes, MAX_BATCH_RECORDS) + 1
        elif source.fmt == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(source.path).metadata.num_rows + 1
        else:
            return None
    return total


def plan_workers(
    requested: int,
    sources: Sequence[Source],
    chunk_bytes: int,
    proc_self: Path = Path("/proc/self"),
) -> tuple[int, str | None]:
    """The pool size for a ``--workers`` request, and one line saying why if it was lowered."""
    cpus, how = usable_cpus(proc_self)
    batches = batch_bound(sources, chunk_bytes)
    workers = min(requested, cpus, batches if batches is not None else requested)
    workers = max(workers, 1)
    if workers >= requested:
        return requested, None
    reasons = [f"{cpus} CPU{'s' if cpus != 1 else ''} usable by this process ({how})"]
    if batches is not None:
        reasons.append(f"the input makes at most {batches:,} batch{'es' if batches != 1 else ''}")
    return workers, f"--workers {requested:,} lowered to {workers}: " + "; ".join(reasons)
