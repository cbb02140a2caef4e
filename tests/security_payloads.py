"""Hostile inputs for the security tests: each payload only creates a marker file."""

from __future__ import annotations

import pickle
from pathlib import Path


class TouchMarker:
    """Unpickling this calls ``open(marker, "w")``: the marker's existence proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_bytes(marker: Path) -> bytes:
    """A plain pickle that creates ``marker`` when unpickled."""
    return pickle.dumps(TouchMarker(marker))
