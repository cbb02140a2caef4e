"""Optional packages and the extra of ``setup.py`` that installs each.

Every import of an optional package goes through :func:`require` (or :func:`missing_extra` for a
check made before the work starts), so a missing one says which extra to install instead of
ending in a ``ModuleNotFoundError`` traceback. Stdlib only: the check itself imports nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# Top-level module -> the extra (setup.py EXTRAS_REQUIRE) that installs it.
EXTRA_OF: dict[str, str] = {
    "wandb": "wandb",
    "lm_eval": "eval",
    "safetensors": "export",
    "transformers": "export",
    "accelerate": "export",
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def install_hint(module: str) -> str:
    """``pip install 'megatron-qk[EXTRA]'`` for an optional module (dotted names allowed)."""
    extra = EXTRA_OF[module.split(".")[0]]
    return f"pip install 'megatron-qk[{extra}]'"


def _message(module: str, purpose: str) -> str:
    top = module.split(".")[0]
    return f"{purpose} needs the optional package {top}: {install_hint(top)}"


def missing_extra(module: str, purpose: str) -> MissingExtraError | None:
    """The error :func:`require` would raise, without importing anything (None: installed).

    Args:
        module: the optional module, e.g. ``"wandb"`` (its top-level package is looked up).
        purpose: what needs it, e.g. ``"logging.wandb: online"``; starts the message.
    """
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return MissingExtraError(_message(module, purpose))
    return None


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional module, or raise :class:`MissingExtraError` naming its extra.

    Args:
        module: the module to import, e.g. ``"safetensors.torch"``.
        purpose: what needs it, e.g. ``"export --format hf"``; starts the message.

    Raises:
        MissingExtraError: the module's top-level package is not installed. A package that is
            installed but fails on one of its own dependencies raises the original error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise
        raise MissingExtraError(_message(module, purpose)) from None
