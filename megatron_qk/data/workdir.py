"""Output naming and the resumable work directory of ``megatron-qk preprocess``.

While a run is in progress everything lives in ``<prefix>_preprocess.partial/``: the growing
``.bin`` files, their lengths side files and ``manifest.json``. The manifest is the commit record:
it is replaced atomically after the data files are fsynced, and names the committed byte sizes,
the input position and the running counts. A rerun truncates the data files back to the last
commit and continues from the recorded position, so the final files equal those of an
uninterrupted run. The final ``.bin``/``.idx``/summary are produced inside the work directory and
only renamed to their public names at the end (the ``finalizing`` phase, itself resumable), so a
partial output is never visible under a final name.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from megatron_qk.data.readers import PreprocessError
from megatron_qk.data.safe_files import open_nofollow
from megatron_qk.rundir.atomic import fsync_dir, write_json_atomic

MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    """Public output names for ``--output-prefix``."""

    prefix: str

    @property
    def train_prefix(self) -> str:
        """Megatron data prefix of the training split (``P_text_document``)."""
        return f"{self.prefix}_text_document"

    @property
    def valid_prefix(self) -> str:
        """Megatron data prefix of the validation split (``P_valid_text_document``)."""
        return f"{self.prefix}_valid_text_document"

    @property
    def summary(self) -> Path:
        """The run summary (``P_summary.json``)."""
        return Path(f"{self.prefix}_summary.json")

    @property
    def work_dir(self) -> Path:
        """Where an unfinished run keeps its state."""
        return Path(f"{self.prefix}_preprocess.partial")

    def split_prefix(self, split: str) -> str:
        """Data prefix for ``"train"`` or ``"valid"``."""
        return self.train_prefix if split == "train" else self.valid_prefix


class WorkDir:
    """The ``<prefix>_preprocess.partial`` directory, locked against concurrent runs.

    Args:
        path: directory path.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_file: Any = None

    def file(self, name: str) -> Path:
        """Path of a file inside the work directory."""
        return self.path / name

    @property
    def manifest_path(self) -> Path:
        """The commit record."""
        return self.path / "manifest.json"

    def acquire(self) -> None:
        """Create the directory and take an exclusive lock.

        Raises:
            PreprocessError: if another process holds the lock (same ``--output-prefix``).
        """
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise PreprocessError(
                f"{self.path} is a link or belongs to another user (uid {st.st_uid}); a work "
                "directory must be your own: remove it or choose another --output-prefix"
            )
        self._lock_file = open_nofollow(self.path / "lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._lock_file.close()
            self._lock_file = None
            raise PreprocessError(
                f"another preprocess run holds {self.path} (same --output-prefix); wait for it"
            ) from e

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def read_manifest(self) -> dict[str, Any] | None:
        """The committed manifest, or ``None`` when there is none.

        Raises:
            PreprocessError: if it exists but is unreadable or of another version.
        """
        try:
            with open_nofollow(self.manifest_path, "r", encoding="utf-8") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise PreprocessError(
                f"{self.manifest_path} is unreadable ({e}); rerun with --overwrite to start over"
            ) from e
        if manifest.get("version") != MANIFEST_VERSION:
            raise PreprocessError(
                f"{self.manifest_path} has version {manifest.get('version')!r}, expected "
                f"{MANIFEST_VERSION}; rerun with --overwrite to start over"
            )
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Atomically replace the manifest (the commit point)."""
        write_json_atomic(self.manifest_path, {"version": MANIFEST_VERSION, **manifest}, mode=0o600)

    def clear(self) -> None:
        """Delete everything in the directory except the lock."""
        for entry in self.path.iterdir():
            if entry.name != "lock":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def remove(self) -> None:
        """Release the lock and delete the directory."""
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)


def final_moves(
    paths: OutputPaths, work: WorkDir, documents: dict[str, int]
) -> tuple[list[tuple[str, str]], list[str]]:
    """The renames and removals that publish a finished run, derived from the output prefix.

    Never taken from the manifest: a work directory is data that could name any path, and a
    resumed finalisation must move only our own files to our own public names.

    Args:
        paths: the public names.
        work: the work directory holding the finished files.
        documents: committed documents per split (a split without documents has no output, and
            stale public files of an older run under its name are removed).
    """
    renames: list[tuple[str, str]] = []
    removals: list[str] = []
    for split in ("train", "valid"):
        public = paths.split_prefix(split)
        if int(documents.get(split, 0)) > 0:
            renames += [
                (str(work.file(f"{split}.{ext}")), f"{public}.{ext}") for ext in ("bin", "idx")
            ]
        else:
            removals += [f"{public}.bin", f"{public}.idx"]
    renames.append((str(work.file("summary.json")), str(paths.summary)))
    return renames, removals


def publish(renames: list[tuple[str, str]], removals: list[str]) -> None:
    """Move finished files to their public names and delete stale outputs (idempotent).

    A source that no longer exists was moved by an earlier, interrupted attempt. A source that is
    a link (planted in the work directory) is refused rather than published.
    """
    for src, dst in renames:
        if os.path.lexists(src):
            if not stat.S_ISREG(os.lstat(src).st_mode):
                raise PreprocessError(
                    f"{src} is not a regular file (a link?); refusing to publish it"
                )
            os.replace(src, dst)
    for path in removals:
        Path(path).unlink(missing_ok=True)
    for parent in {Path(dst).resolve().parent for _, dst in renames}:
        fsync_dir(parent)
