"""The one error type of recipe problems, shared by every config section and the loader."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe is invalid. ``path`` is the dotted YAML path of the offending key."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)
