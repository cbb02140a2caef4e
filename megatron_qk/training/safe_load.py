"""Read checkpoint files as data: nothing in a checkpoint directory can run code when loaded.

Checkpoints are shared between people and kept on shared storage, so every file of one is
untrusted input. Three kinds of file are unpickled when a checkpoint is loaded:

- our own ``train_state.pt`` and ``rng_rank{R}.pt``: loaded with ``torch.load(weights_only=True)``
  (tensors and plain values only); the numpy RNG state needs three numpy globals, admitted by name
  through an explicit allowlist (:data:`NUMPY_RNG_GLOBALS`);
- the dist-checkpoint ``.metadata``: torch's ``FileSystemReader`` reads it with a bare
  ``pickle.load`` before any caller sees it, so :func:`check_dist_checkpoint` unpickles it first
  with :class:`MetadataUnpickler`, which resolves only torch's checkpoint metadata types, sizes,
  dtypes and plain builtins;
- the byte items inside the ``.distcp`` files (Megatron's ``ShardedObject`` values such as
  ``_extra_state``), which torch's default planner loads with ``weights_only=False``: each is
  located through the (already checked) metadata and test-loaded with ``weights_only=True``;
  Megatron's ``common.pt`` likewise.

A refused file raises :class:`UnsafeCheckpointError` naming it; nothing from it has run.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than plain data (or is not a checkpoint file)."""


def _numpy_multiarray():
    """numpy's ``multiarray`` module, imported explicitly.

    ``import numpy`` does not import the ``numpy._core`` subpackage under numpy 1.26 (1.26.4
    ships it as a stub for reading numpy 2 pickles; earlier 1.26 releases lack it), so the
    attribute ``np._core`` does not exist there; ``numpy.core`` is its 1.x name (deprecated, with
    a warning, under numpy 2, hence tried second).
    """
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def _numpy_rng_globals() -> list[Any]:
    """The numpy globals a pickled ``np.random.get_state()`` tuple needs, under both spellings.

    numpy >= 2 pickles arrays through ``numpy._core.multiarray._reconstruct``; files written under
    numpy 1.x name ``numpy.core.multiarray._reconstruct`` for the same function.
    """
    reconstruct = _numpy_multiarray()._reconstruct  # noqa: SLF001 - what numpy pickles by name
    return [
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType: the MT19937 key array's dtype
    ]


NUMPY_RNG_GLOBALS = _numpy_rng_globals()


def load_state_file(path: Path) -> Any:
    """Load one of our own ``.pt`` state files without running code from it.

    Args:
        path: ``train_state.pt`` or ``rng_rank{R}.pt`` of a checkpoint.

    Raises:
        UnsafeCheckpointError: the file references a global outside the allowlist (the message
            names the file and the global), or is not a torch file.
    """
    try:
        with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing {path}: it holds objects other than tensors and plain values "
            f"(only those load; the unpickler said: {str(e).splitlines()[-1]})"
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise UnsafeCheckpointError(f"{path} is not a readable torch state file: {e}") from e


# ---------------------------------------------------------------------------------------------
# The dist-checkpoint metadata

_BUILTINS = frozenset(
    {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "int",
        "float",
        "bool",
        "str",
        "bytes",
        "complex",
        "slice",
        "bytearray",
    }  # fmt: skip
)
# Every class torch's filesystem writer pickles into ``.metadata`` (checked against a checkpoint
# saved by megatron_qk: Metadata, the storage/chunk/tensor descriptors, the save plan items and
# the file offsets), plus the few other torch helpers its pickling reduces to.
_TORCH_METADATA_MODULES = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }  # fmt: skip
    ),
    "torch.distributed.checkpoint.planner": frozenset(
        {
            "SavePlan",
            "WriteItem",
            "WriteItemType",
            "TensorWriteData",
            "LoadItemType",
            "ReadItem",
        }  # fmt: skip
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "collections": frozenset({"OrderedDict"}),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a dist-checkpoint ``.metadata`` admitting only its known types.

    Resolves torch's checkpoint metadata classes, ``torch.Size``, torch dtypes, ``OrderedDict``
    and plain builtin containers/scalars; any other global (a function to call, a class with
    side effects) raises :class:`UnsafeCheckpointError` before it is looked up.
    """

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """Resolve a global only when it is on the allowlist."""
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        if module == "torch":
            if name == "Size":
                return torch.Size
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype):
                return value
        elif name in _TORCH_METADATA_MODULES.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing {self.source}: it references {module}.{name}, which is not a "
            "checkpoint metadata type (a .metadata holds only torch's checkpoint descriptors)"
        )


def read_metadata(path: Path) -> Any:
    """Unpickle a dist-checkpoint ``.metadata`` file through :class:`MetadataUnpickler`.

    Raises:
        UnsafeCheckpointError: a disallowed global, or not a checkpoint metadata object.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise UnsafeCheckpointError(f"{path} is not a readable checkpoint metadata: {e}") from e
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(
            f"{path} holds a {type(metadata).__name__}, not torch checkpoint Metadata"
        )
    return metadata


def _check_byte_items(ckpt_dir: Path, metadata: Any) -> None:
    """Test-load every byte item of the ``.distcp`` files with ``weights_only=True``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    verified: set[bytes] = set()  # most items are the same few bytes (a pickled None)
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        name = str(info.relative_path)
        if Path(name).name != name or name in ("", ".", ".."):
            raise UnsafeCheckpointError(
                f"refusing {ckpt_dir / METADATA_FILE}: item {index.fqn!r} points outside the "
                f"checkpoint directory ({name!r})"
            )
        if info.transform_descriptors:
            raise UnsafeCheckpointError(
                f"refusing {ckpt_dir / name}: item {index.fqn!r} is stored with transforms "
                f"{list(info.transform_descriptors)}, which megatron-qk never writes"
            )
        with open(ckpt_dir / name, "rb") as f:
            f.seek(int(info.offset))
            payload = f.read(int(info.length))
        if payload in verified:
            continue
        try:
            torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means the item is not plain data
            raise UnsafeCheckpointError(
                f"refusing {ckpt_dir / name}: item {index.fqn!r} is not plain data "
                f"({str(e).splitlines()[-1] if str(e) else type(e).__name__})"
            ) from e
        verified.add(payload)


def check_dist_checkpoint(ckpt_dir: Path) -> None:
    """Verify that Megatron's loader will unpickle only data from ``ckpt_dir``.

    Call before ``megatron.core.dist_checkpointing.load``: checks ``.metadata`` with the restricted
    unpickler, every byte item of the ``.distcp`` files and ``common.pt`` with
    ``weights_only=True``.

    Raises:
        UnsafeCheckpointError: naming the refused file.
        FileNotFoundError: ``.metadata`` is missing.
    """
    meta_path = ckpt_dir / METADATA_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: not a complete distributed checkpoint")
    metadata = read_metadata(meta_path)
    _check_byte_items(ckpt_dir, metadata)
    common = ckpt_dir / COMMON_FILE
    if common.exists():
        load_state_file(common)


# ---------------------------------------------------------------------------------------------
# Module extra state handed to load_state_dict

# Opcodes of a pickled ``None`` (any protocol): the only pickle an extra state may hold.
_NONE_PICKLE_OPS = frozenset({"PROTO", "FRAME", "NONE", "STOP"})


def _extra_state_items(state: Any, prefix: str = ""):
    if isinstance(state, dict):
        for key, value in state.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if name.endswith("_extra_state"):
                yield name, value
            else:
                yield from _extra_state_items(value, name)


def check_extra_states(state: Any, source: Path) -> None:
    """Refuse module extra states that Transformer Engine would unpickle.

    TE's ``set_extra_state`` restores FP8 metadata by ``pickle.loads`` of its ``_extra_state``
    byte tensor. megatron-qk trains without FP8, so a genuine extra state is ``None``, an empty
    tensor or the pickle of ``None``; anything else is refused before ``load_state_dict``.

    Raises:
        UnsafeCheckpointError: naming the checkpoint and the key.
    """
    import pickletools

    for name, value in _extra_state_items(state):
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        payload = value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        try:
            ops = {op.name for op, _, _ in pickletools.genops(payload)}
        except Exception:  # noqa: BLE001 - not even a pickle: still nothing TE may unpickle
            ops = {"<unparsable>"}
        if not ops <= _NONE_PICKLE_OPS:
            raise UnsafeCheckpointError(
                f"refusing {source}: {name} holds a pickled object (FP8 state, which megatron-qk "
                "never writes); Transformer Engine would unpickle it on load"
            )
