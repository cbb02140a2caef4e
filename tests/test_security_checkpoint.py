"""Checkpoints are data: planted pickles in any checkpoint file are refused and never run."""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from security_payloads import TouchMarker, payload_bytes

from megatron_qk.config.loader import load_config
from megatron_qk.training.safe_load import UnsafeCheckpointError, read_metadata


class _NoOptimizer:
    """save_checkpoint needs only ``sharded_state_dict`` from an optimizer."""

    def sharded_state_dict(self, model_sharded, is_loading, metadata):
        return {}


@pytest.fixture(scope="module")
def saved(single_rank, tmp_path_factory):
    """A tiny model and one genuine checkpoint of it (step 3)."""
    from megatron_qk.training.checkpoint import TrainState, save_checkpoint
    from megatron_qk.training.restore import build_initial_model

    cfg = load_config("tiny")
    model = build_initial_model(cfg, torch.device("cpu"))
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    state = TrainState(3, 24, {"last_epoch": 3}, {"note": "x"})
    path = save_checkpoint(root, [model], _NoOptimizer(), state)
    return model, path


def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "checkpoints" / path.name
    shutil.copytree(path, dst)
    return dst


def _load(model, path: Path, restore_rng: bool = True):
    from megatron_qk.training.checkpoint import load_checkpoint

    return load_checkpoint(path, [model], optimizer=None, restore_rng=restore_rng)


def test_genuine_checkpoint_loads_with_rng(saved):
    model, path = saved
    state = _load(model, path)
    assert (state.step, state.consumed_samples, state.extra) == (3, 24, {"note": "x"})


@pytest.mark.parametrize("name", ["train_state.pt", "rng_rank0.pt"])
def test_planted_pickle_in_state_file_is_refused(saved, tmp_path, name):
    model, path = saved
    ckpt = _copy(path, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"step": TouchMarker(marker)}, ckpt / name)
    with pytest.raises(UnsafeCheckpointError, match=name):
        _load(model, ckpt)
    assert not marker.exists()


def test_planted_metadata_is_refused_before_megatron_reads_it(saved, tmp_path):
    model, path = saved
    ckpt = _copy(path, tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(payload_bytes(marker))
    # Python 3.12 pickles io.open under its defining module, _io (the 3.12 leg).
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: it references _?io\.open"):
        _load(model, ckpt, restore_rng=False)
    assert not marker.exists()


def test_metadata_of_a_real_checkpoint_passes_the_restricted_unpickler(saved):
    from torch.distributed.checkpoint.metadata import Metadata

    _, path = saved
    metadata = read_metadata(path / ".metadata")
    assert isinstance(metadata, Metadata)
    assert pickle.loads((path / ".metadata").read_bytes()).state_dict_metadata.keys() == (
        metadata.state_dict_metadata.keys()
    )


def test_planted_byte_item_in_distcp_is_refused(saved, tmp_path):
    """An ``_extra_state`` item redirected to a pickle payload (torch's planner would unpickle it
    with ``weights_only=False``)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    model, path = saved
    ckpt = _copy(path, tmp_path)
    marker = tmp_path / "pwned"
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())
    evil = io.BytesIO()
    torch.save(TouchMarker(marker), evil)
    (ckpt / "__9_0.distcp").write_bytes(evil.getvalue())
    # Our canonical layout saves no byte items (no ``_extra_state``); a checkpoint from elsewhere
    # (an older megatron-qk, stock Megatron with TE) can carry them, so plant one.
    fqn = "model.decoder.layers.0.self_attention.linear_qkv._extra_state/shard_0_1"
    metadata.state_dict_metadata[fqn] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(fqn)] = _StorageInfo("__0_0.distcp", 0, 0)
    redirected = 0
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
            info.relative_path, info.offset, info.length = "__9_0.distcp", 0, len(evil.getvalue())
            redirected += 1
    assert redirected > 0
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="__9_0.distcp"):
        _load(model, ckpt, restore_rng=False)
    assert not marker.exists()


def test_latest_marker_cannot_point_outside_the_checkpoint_root(saved, tmp_path):
    from megatron_qk.rundir.layout import latest_checkpoint

    _, path = saved
    outside = tmp_path / "elsewhere" / "iter_0000003"
    shutil.copytree(path, outside)
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text("../../elsewhere/iter_0000003\n")
    with pytest.raises(RuntimeError, match="not a checkpoint"):
        latest_checkpoint(root)


def test_extra_state_that_transformer_engine_would_unpickle_is_refused(tmp_path):
    """TE's set_extra_state runs pickle.loads on a non-empty ``_extra_state`` byte tensor."""
    from megatron_qk.training.safe_load import check_extra_states

    def as_tensor(data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    marker = tmp_path / "pwned"
    genuine = {
        "model": {
            "decoder.layers.0.mlp.linear_fc1._extra_state": None,
            "decoder.layers.0.self_attention.linear_proj._extra_state": torch.empty(0),
            "decoder.layers.1.mlp.linear_fc1._extra_state": as_tensor(pickle.dumps(None)),
            "decoder.layers.1.mlp.linear_fc1.weight": torch.ones(2),
        }
    }
    check_extra_states(genuine, tmp_path)
    hostile = {"model": {"decoder.layers.0.mlp.linear_fc2._extra_state": as_tensor(
        payload_bytes(marker))}}  # fmt: skip
    with pytest.raises(UnsafeCheckpointError, match=r"linear_fc2\._extra_state holds a pickled"):
        check_extra_states(hostile, tmp_path)
    assert not marker.exists()
