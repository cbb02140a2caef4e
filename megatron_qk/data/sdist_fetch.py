"""Download one hash-pinned file from a Python package index, without pip and without a build.

``pip download`` of an sdist prepares its metadata, which runs the package's build backend (and
installs its build requirements, unhashed, into an isolated environment). Fetching the GPT-2 ranks
needs none of that: this module finds the file's link on the index's simple page (PEP 503; the
index from ``PIP_INDEX_URL`` when set, so a PyPI mirror works), streams it with a size bound and
accepts it only when its sha256 equals the pinned one. Nothing downloaded is executed.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import IO

from megatron_qk.data.tokenizer import TokenizerError

DEFAULT_INDEX = "https://pypi.org/simple"
# Bounds on what is read from the network (the whisper sdist is about 0.8 MB, its index page
# a few kB per release).
MAX_INDEX_PAGE_BYTES = 8 * 1024 * 1024
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
_CHUNK = 1 << 16

Opener = Callable[[str], IO[bytes]]


def _urlopen(url: str) -> IO[bytes]:
    return urllib.request.urlopen(url, timeout=60)  # noqa: S310 - http(s)/file index URLs


def default_index_url() -> str:
    """``PIP_INDEX_URL`` when set, else PyPI's simple index."""
    return os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX


def _read_bounded(stream: IO[bytes], limit: int, what: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise TokenizerError(f"{what} is larger than {limit} bytes; refusing to read more")
    return data


def find_file_url(index: str, project: str, filename: str, opener: Opener = _urlopen) -> str:
    """The URL of ``filename`` on ``index``'s simple page for ``project``.

    Raises:
        TokenizerError: the page cannot be read or does not link the file.
    """
    page_url = f"{index.rstrip('/')}/{project}/"
    try:
        with opener(page_url) as response:
            page = _read_bounded(response, MAX_INDEX_PAGE_BYTES, page_url)
    except OSError as e:
        raise TokenizerError(f"cannot read the package index page {page_url}: {e}") from e
    for href in re.findall(rb'href=["\']([^"\']+)["\']', page):
        url = urllib.parse.urljoin(page_url, href.decode("utf-8", "replace"))
        path = urllib.parse.urlsplit(url).path
        if urllib.parse.unquote(path.rsplit("/", 1)[-1]) == filename:
            return url
    raise TokenizerError(f"{page_url} does not list {filename}")


def download_verified(
    url: str, sha256: str, opener: Opener = _urlopen, max_bytes: int = MAX_DOWNLOAD_BYTES
) -> bytes:
    """Download ``url`` (at most ``max_bytes``) and return it only if its sha256 is ``sha256``.

    Raises:
        TokenizerError: a network error, an oversized body or a hash mismatch.
    """
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    size = 0
    try:
        with opener(url) as response:
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise TokenizerError(f"{url} is larger than {max_bytes} bytes; refused")
                digest.update(chunk)
                chunks.append(chunk)
    except OSError as e:
        raise TokenizerError(f"cannot download {url}: {e}") from e
    if digest.hexdigest() != sha256:
        raise TokenizerError(f"{url}: sha256 {digest.hexdigest()} is not the pinned {sha256}")
    return b"".join(chunks)
