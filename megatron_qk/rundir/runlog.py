"""Reading a run directory back: ``RunLog``, the one loader of every analysis command (torch-free).

``metrics.jsonl`` holds one JSON record per line, each with a ``kind`` (``train``, ``eval``,
``diag``, ``release``, ``event``; fields in ``docs/RUN_DIRECTORY.md``). A resumed run's file reads
as one uninterrupted run (the trainer drops lines after the resumed checkpoint first), so the
records are kept in file order as written; the one place where a step could still appear twice,
the evaluation curve, keeps the last line of a step (:meth:`RunLog.evals_by_step`). A line that is
not JSON is an error naming ``path:line``.

The log is read lazily: opening a ``RunLog`` touches no file, so a caller checks ``summary.json``
and ``config.yaml`` in its own order and with its own messages first.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from megatron_qk.rundir.layout import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

RECORD_KINDS = ("train", "eval", "diag", "release", "event")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in file order (blank lines skipped).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming ``path:line`` of a line that is not JSON.
    """
    records = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno}: invalid JSON line") from None
    return records


class RunLog:
    """One run directory: its metrics records by kind, and where its config and summary are.

    Args:
        path: the run directory, or its metrics file (then the run directory is the file's
            directory, which holds ``config.yaml`` and ``summary.json``).
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            self.run_dir, self.metrics_path = path, path / METRICS_FILE
        else:
            self.run_dir, self.metrics_path = path.parent, path

    @property
    def config_path(self) -> Path:
        """The run's resolved recipe (``config.yaml``)."""
        return self.run_dir / CONFIG_FILE

    @property
    def summary_path(self) -> Path:
        """The run's ``summary.json`` (absent while the run is unfinished)."""
        return self.run_dir / SUMMARY_FILE

    def has_metrics(self) -> bool:
        """Whether the metrics file exists."""
        return self.metrics_path.is_file()

    def summary(self) -> dict[str, Any] | None:
        """The parsed ``summary.json``, or None when the run has none.

        Raises:
            ValueError: (``json.JSONDecodeError``) when the file is not JSON.
        """
        if not self.summary_path.is_file():
            return None
        return json.loads(self.summary_path.read_text(encoding="utf-8"))

    @functools.cached_property
    def records(self) -> list[dict]:
        """Every record of the metrics file in file order (read on first use).

        Raises:
            FileNotFoundError: when the metrics file is missing.
            ValueError: naming ``path:line`` of a line that is not JSON.
        """
        return read_metrics(self.metrics_path)

    def of_kind(self, kind: str) -> list[dict]:
        """The records of one ``kind``, in file order."""
        return [r for r in self.records if r.get("kind") == kind]

    @property
    def train(self) -> list[dict]:
        """``train`` records."""
        return self.of_kind("train")

    @property
    def evals(self) -> list[dict]:
        """``eval`` records."""
        return self.of_kind("eval")

    @property
    def diags(self) -> list[dict]:
        """``diag`` records (the mechanism diagnostics of each evaluation)."""
        return self.of_kind("diag")

    @property
    def releases(self) -> list[dict]:
        """``release`` records (a multiplier rule or the entropy floor released)."""
        return self.of_kind("release")

    @property
    def events(self) -> list[dict]:
        """``event`` records (sharp-entropy crossing, preemption)."""
        return self.of_kind("event")

    def event(self, name: str) -> dict | None:
        """The last ``event`` record named ``name`` (None when there is none)."""
        found = [r for r in self.events if r.get("event") == name]
        return found[-1] if found else None

    def evals_by_step(self) -> dict[int, dict]:
        """``eval`` records by step in step order; a step logged twice keeps its last line."""
        by_step = {int(r["step"]): r for r in self.evals}
        return {step: by_step[step] for step in sorted(by_step)}

    @property
    def last_step(self) -> int:
        """The largest ``step`` of any record (0 for an empty log)."""
        return max((int(r.get("step", 0)) for r in self.records), default=0)
