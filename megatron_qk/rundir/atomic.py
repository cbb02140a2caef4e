"""The one atomic file write of the project: a reader sees the old file or the new one, whole.

Every write goes to a fresh, uniquely named temporary file in the target's directory (created
with ``O_EXCL | O_NOFOLLOW``, so a link planted at a predictable name is never written through),
is flushed and fsynced, replaces the target with :func:`os.replace` and then fsyncs the
directory, so the new name survives a crash as well as the new content. An interrupted write
leaves the target untouched and removes its temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# Default permission bits of a new file before the umask, as ``open(path, "w")`` would use.
DEFAULT_MODE = 0o666


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a completed rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(target: Path, mode: int) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue  # another writer's temporary file: draw another name


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], binary: bool = False, mode: int = DEFAULT_MODE
) -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without error.

    Args:
        path: the file to (re)place; its directory must exist.
        binary: open in binary mode (else UTF-8 text).
        mode: permission bits of the new file (the umask applies); 0o600 for private files.

    Yields:
        The open temporary file.
    """
    target = Path(path)
    fd, tmp = _create_temp(target, mode)
    try:
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int = DEFAULT_MODE) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, binary=True, mode=mode) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str, mode: int = DEFAULT_MODE) -> None:
    """Replace ``path`` with UTF-8 ``text`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, mode=mode) as f:
        f.write(text)


def write_json_atomic(
    path: str | os.PathLike[str], data: Any, sort_keys: bool = False, mode: int = DEFAULT_MODE
) -> None:
    """Replace ``path`` with ``data`` as indented JSON plus a final newline, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", mode=mode)
