"""Opening files in directories others may have prepared: never through a planted link.

A work directory or output directory can hold a symlink someone planted (``train.bin ->
~/.bashrc``); a plain ``open(path, "wb")`` or ``"r+b"`` followed by ``truncate`` would then
destroy the link's target. :func:`open_nofollow` refuses a final-component link (``O_NOFOLLOW``)
and creates new files ``0600``. Temporary files of atomic writes come from
:mod:`megatron_qk.rundir.atomic`, which never opens one through a link planted at a predictable
name.
"""

from __future__ import annotations

import errno
import os
from typing import IO, Any

_FLAGS = {
    "rb": os.O_RDONLY,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "r+b": os.O_RDWR,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "r": os.O_RDONLY,
}


def open_nofollow(path: str | os.PathLike[str], mode: str, **kwargs: Any) -> IO:
    """``open(path, mode)`` that fails with ``OSError(ELOOP)`` when ``path`` is a symlink.

    Args:
        path: the file.
        mode: one of ``rb``, ``wb``, ``r+b``, ``r``, ``w``.
        kwargs: passed to :func:`os.fdopen` (``encoding`` for text modes).
    """
    try:
        fd = os.open(path, _FLAGS[mode] | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, f"refusing to open {path}: it is a symbolic link") from e
        raise
    try:
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise
