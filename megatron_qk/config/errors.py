"""What every config section shares: the error type of recipe problems and the field marker of
keys outside a run's identity."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe is invalid. ``path`` is the dotted YAML path of the offending key."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


# Field metadata of a recipe key that does not define the run (a label, a location, logging,
# resume bookkeeping): two recipes that differ only in such keys train the same model.
# :func:`megatron_qk.config.identity.identity_excluded_keys` collects them.
NOT_IDENTITY = {"identity": False}
