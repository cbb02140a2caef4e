"""The dataset index cache is ours: private to the user and checked before Megatron reads it.

Megatron-Core's ``GPTDataset`` and ``BlendedDataset`` load their cached index arrays with
``numpy.load(..., allow_pickle=True)``, and numpy unpickles any file that lacks the ``.npy``
header. A cache directory someone else can write to, or one that came with a copied run
directory, is therefore code. :func:`prepare_cache_dir` decides where the cache lives and checks
it before any dataset is built:

- for a run directory that is not the user's (``diagnose``/``eval`` of someone else's run), a
  private directory under ``$XDG_CACHE_HOME/megatron-qk/data_cache/`` keyed by the run
  directory's path; otherwise ``data.cache_dir`` when the recipe sets one, else
  ``<run_dir>/data_cache``;
- the directory is created ``0700``; it must be a real directory owned by the user and not
  writable by group or others;
- every ``*.npy`` in it must be a regular file (not a link) with a numpy header whose dtype holds
  no Python objects, and must load with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np

from megatron_qk.config.errors import ConfigError


def private_cache_root() -> Path:
    """``$XDG_CACHE_HOME/megatron-qk/data_cache`` (default ``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "megatron-qk" / "data_cache"


def _owned_by(path: Path, uid: int) -> bool:
    try:
        return path.stat().st_uid == uid
    except FileNotFoundError:
        return True  # a run directory we are about to create is ours


def ensure_private_dir(path: Path, uid: int, field: str = "data.cache_dir") -> None:
    """Create ``path`` (``0700``) or check an existing one is the user's and not shared-writable.

    Raises:
        ConfigError: naming the directory and what is wrong with it.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(field, f"cache directory {path} is a link or not a directory")
    if st.st_uid != uid:
        raise ConfigError(
            field, f"cache directory {path} belongs to uid {st.st_uid}, not to you (uid {uid})"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            field,
            f"cache directory {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"its index files are loaded with pickle enabled by Megatron: chmod go-w {path}",
        )


def check_cached_array(path: Path) -> None:
    """Refuse a cached index that is not a plain numpy array file.

    Raises:
        ConfigError: a link, a missing header, an object dtype, or a file numpy cannot read
            without pickle.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ConfigError("data.cache_dir", f"refusing cached index {path}: {e}") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError("data.cache_dir", f"refusing cached index {path}: not a file")
        try:
            version = np.lib.format.read_magic(f)
            header = (
                np.lib.format.read_array_header_1_0(f)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(f)
            )
        except ValueError as e:
            raise ConfigError(
                "data.cache_dir",
                f"refusing cached index {path}: no numpy header ({e}); delete it to rebuild",
            ) from e
    dtype = header[2]
    if dtype.hasobject:
        raise ConfigError(
            "data.cache_dir",
            f"refusing cached index {path}: dtype {dtype} holds Python objects (pickle)",
        )
    try:
        np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as e:
        raise ConfigError("data.cache_dir", f"refusing cached index {path}: {e}") from e


def prepare_cache_dir(configured: str | None, run_dir: str | Path, uid: int | None = None) -> str:
    """The checked cache directory for a run's datasets (see the module docstring).

    Args:
        configured: ``data.cache_dir`` of the recipe (None: derive from ``run_dir``).
        run_dir: the run directory whose datasets are built.
        uid: the user to check ownership against (default: this process's).

    Raises:
        ConfigError: an unsafe directory or cached index file.
    """
    uid = os.getuid() if uid is None else uid
    run_dir = Path(run_dir)
    if not _owned_by(run_dir, uid):
        # diagnose/eval of someone else's run: neither its data_cache/ nor the cache_dir its
        # recipe names is ours to trust.
        key = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        root = private_cache_root()
        ensure_private_dir(root, uid, field="data")
        path = root / f"{run_dir.name}-{key}"
    elif configured:
        path = Path(configured)
    else:
        path = run_dir / "data_cache"
    ensure_private_dir(path, uid)
    for entry in sorted(path.iterdir()):
        if entry.name.endswith(".npy"):
            check_cached_array(entry)
    return str(path)
