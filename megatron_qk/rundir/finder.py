"""Finding run directories under the paths a user gives (stdlib only): the one finder of
``compare``, ``readout``, ``plot``, ``replay-release`` and the downstream table.

The table runner (``examples/launch/run_table.sh``) trains a run once and *links* it into every
table directory that needs it (``runs/table6_entropy_floor/control-s1 ->
runs/table1_gpt270m/control-s1``), so the finder follows symbolic links. It refuses a link that
leads back into a directory it is already inside (a cycle). A run reached twice under the same
name in the same directory (given twice, given and found, or through a linked parent) is listed
once, where first reached; a run linked into two tables, or under another arm's name, is listed
in each place, since each stands for an arm there.

A linked run belongs to the table it is linked into: its *label* (the arm it stands for in that
table) is the link's name without its ``-s<seed>`` suffix (:func:`run_label`), so Table 9's
``adaptive-s1`` is the ``adaptive`` arm even when it is Table 1's ``intervention`` run. Runs
are grouped by the directory they were reached in (:attr:`FoundRun.group`), not by the recipe's
``name``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from megatron_qk.rundir.layout import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

# A directory holding any of these is a run directory (the finder does not descend into it).
RUN_MARKERS = (SUMMARY_FILE, CONFIG_FILE, METRICS_FILE)
_LINK_NAME = re.compile(r"^(?P<arm>.+)-s(?P<seed>\d+)$")


class RunFinderError(ValueError):
    """A path given cannot be searched (missing, a link cycle, or no run below it)."""


@dataclass(frozen=True)
class FoundRun:
    """A run directory as reached under a path given.

    Attributes:
        path: the directory as reached (through any links), e.g.
            ``runs/table9_fixed_release/adaptive-s1``.
        resolved: its real location (the same run reached twice has one ``resolved``).
    """

    path: Path
    resolved: Path

    @property
    def linked(self) -> bool:
        """Whether the run directory itself is a symbolic link (a run shared by tables)."""
        return self.path.is_symlink()

    @property
    def group(self) -> str:
        """The directory the run was reached in: the table (or architecture pair) it belongs to."""
        return str(self.path.parent)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run's ``summary.json``, ``config.yaml`` or ``metrics.jsonl``."""
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def run_label(path: str | Path, arm: str, seed: int | None) -> str:
    """The arm a run stands for where it was reached.

    A run directory that is a link named ``<label>-s<seed>`` (the table runner's naming, with
    the run's own seed) stands for ``<label>``; any other run for its recipe's ``arm``.
    """
    path = Path(path)
    match = _LINK_NAME.match(path.name)
    if path.is_symlink() and match and seed is not None and int(match["seed"]) == int(seed):
        return match["arm"]
    return arm


def _walk(top: Path, inside: tuple[Path, ...], out: list[Path]) -> None:
    """Run directories below ``top`` (sorted by name), following links; ``inside`` holds the
    real paths of the directories being searched, for the cycle check."""
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError as exc:
        raise RunFinderError(f"{top}: cannot list ({exc.strerror})") from None
    for entry in entries:
        child = Path(entry.path)
        if not child.is_dir():  # follows links; a dangling link is skipped
            continue
        real = child.resolve()
        if real in inside:
            raise RunFinderError(
                f"{child}: link cycle (it leads back to {real}, which contains it); remove the link"
            )
        if is_run_dir(child):
            out.append(child)
        else:
            _walk(child, inside + (real,), out)


def find_runs(paths: Iterable[str | Path]) -> list[FoundRun]:
    """Every run directory given or found below the paths given, each once.

    Each path is a run directory or a directory searched recursively (following symbolic
    links, not into a run directory found). Runs are in the order of the paths, and by name
    below each path; a run reached again under the same name in the same (real) directory is
    dropped.

    Raises:
        RunFinderError: for a path that is not a directory, a link cycle, or a directory
            without any run directory below it.
    """
    found: list[FoundRun] = []
    seen: set[tuple[Path, Path]] = set()
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise RunFinderError(f"{path}: not a directory")
        if is_run_dir(path):
            below = [path]
        else:
            below = []
            _walk(path, (path.resolve(),), below)
            if not below:
                raise RunFinderError(
                    f"{path}: no run directory ({', '.join(RUN_MARKERS)}) in it or below it"
                )
        for run in below:
            real = run.resolve()
            # Once per name and directory: the same run given twice (or through a linked parent)
            # is one run; linked into two tables, or under another arm's name, it is in each.
            key = (real, run.name, run.parent.resolve())
            if key not in seen:
                seen.add(key)
                found.append(FoundRun(run, real))
    return found
