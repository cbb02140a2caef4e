"""Dataset index caches: private to the user, and a planted pickle is refused before Megatron."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import megatron_reference
from security_payloads import TouchMarker

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.loader import load_config
from megatron_qk.training.data_cache import check_cached_array, prepare_cache_dir


def _indexed_cfg(tmp_path: Path, cache_dir: Path | None = None):
    prefix = tmp_path / "docs"
    rng = np.random.default_rng(0)
    megatron_reference(prefix, [list(rng.integers(0, 50, 40)) for _ in range(60)], np.uint16)
    overrides = [
        "data.kind=indexed",
        f"data.train_prefixes=[{prefix}]",
        "data.split=80,20,0",
        "training.train_steps=2",
    ]
    if cache_dir is not None:
        overrides.append(f"data.cache_dir={cache_dir}")
    return load_config("tiny", overrides)


def test_planted_pickle_in_cached_index_is_refused_and_never_runs(tmp_path):
    from megatron_qk.training.data import build_datasets

    run_dir = tmp_path / "run"
    cfg = _indexed_cfg(tmp_path)
    build_datasets(cfg, 2, str(run_dir))  # the genuine cache
    cached = sorted((run_dir / "data_cache").rglob("*.npy"))
    assert cached
    marker = tmp_path / "pwned"
    for path in cached:  # what numpy.load(allow_pickle=True) would unpickle
        path.write_bytes(pickle.dumps(TouchMarker(marker)))
    with pytest.raises(ConfigError, match="no numpy header"):
        build_datasets(cfg, 2, str(run_dir))
    assert not marker.exists()


def test_object_dtype_npy_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "index.npy"
    np.save(path, np.array([TouchMarker(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="holds Python objects"):
        check_cached_array(path)
    assert not marker.exists()
    link = tmp_path / "link.npy"
    np.save(tmp_path / "real.npy", np.arange(3))
    link.symlink_to(tmp_path / "real.npy")
    with pytest.raises(ConfigError, match="refusing cached index"):
        check_cached_array(link)
    check_cached_array(tmp_path / "real.npy")


def test_someone_elses_run_directory_gets_a_private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    run_dir = tmp_path / "their_run"
    (run_dir / "data_cache").mkdir(parents=True)
    other = os.getuid() + 1  # as seen by that user, the run directory is not theirs
    path = Path(prepare_cache_dir(None, run_dir, uid=os.stat(run_dir).st_uid))
    assert path == run_dir / "data_cache"
    with pytest.raises(ConfigError, match="belongs to uid"):
        prepare_cache_dir(str(run_dir / "data_cache"), run_dir, uid=other)
    # The owner check for the run dir itself routes another user to a private directory, whose
    # root is created for that user; here only the choice of path is observable without root.
    with pytest.raises(ConfigError, match=r"xdg/megatron-qk/data_cache belongs to uid"):
        prepare_cache_dir(None, run_dir, uid=other)


def test_shared_writable_cache_directory_is_refused(tmp_path):
    shared = tmp_path / "shared_cache"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by others"):
        prepare_cache_dir(str(shared), tmp_path / "run")
    fresh = Path(prepare_cache_dir(str(tmp_path / "new_cache"), tmp_path / "run"))
    assert (fresh.stat().st_mode & 0o777) == 0o700


def test_private_cache_path_for_a_foreign_run_directory(tmp_path, monkeypatch):
    from megatron_qk.training import data_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data_cache, "_owned_by", lambda path, uid: False)
    run_dir = tmp_path / "their_run"
    (run_dir / "data_cache").mkdir(parents=True)
    path = Path(prepare_cache_dir(None, run_dir))
    assert path.parent == tmp_path / "xdg" / "megatron-qk" / "data_cache"
    assert path.name.startswith("their_run-") and (path.stat().st_mode & 0o777) == 0o700
    # The cache_dir named by their recipe is not used either.
    assert Path(prepare_cache_dir(str(tmp_path / "their_cache"), run_dir)) == path
    assert not (tmp_path / "their_cache").exists()
