"""Who created a run directory, and for which recipe: a resume continues only one's own run.

A run directory on shared storage can hold someone else's checkpoints (a copied, shared or
pre-created directory). Training resumes from a run directory's latest checkpoint, so without a
check ``megatron-qk train`` on such a path would silently continue another person's run (their
weights, their data position) under one's own recipe. The run directory therefore records
``run_identity.json`` (owner uid and name, the recipe hash) when a run starts, and a resume
requires that:

- the run directory, its ``run_identity.json`` and its ``checkpoints/`` belong to the user (file
  ownership, which a copied or planted file cannot fake), and the recorded owner is the user;
- the recorded recipe hash equals the hash of the recipe being launched (keys that may change on
  resume, such as logging options, are left out of the hash).

A run directory with checkpoints but no identity record (written before the record existed) is
adopted when everything in it belongs to the user, and refused otherwise.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Any

from megatron_qk.config.identity import unset_added_keys
from megatron_qk.config.loader import config_to_dict
from megatron_qk.config.schema import ConfigError, ExperimentConfig
from megatron_qk.rundir.atomic import write_json_atomic
from megatron_qk.rundir.config_hash import hash_config
from megatron_qk.rundir.layout import IDENTITY_FILE, checkpoints_dir
from megatron_qk.training.run_dir import RESUME_FREE_KEYS

_START_OVER = "use another training.output_dir, or set training.resume=false to start over there"


def recipe_hash(recipe: dict[str, Any], free_keys: set[str] | frozenset[str] = frozenset()) -> str:
    """sha256 of the recipe's canonical JSON, leaving out dotted ``free_keys``."""
    return hash_config(recipe, free_keys)


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    """The recorded identity, or None when the run directory has none."""
    path = run_dir / IDENTITY_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(
            "training.output_dir", f"{path} is unreadable ({e}); {_START_OVER}"
        ) from e


def write_identity(run_dir: Path, recipe_sha256: str) -> None:
    """Record this user as the run's owner with the recipe hash (atomic, fsynced)."""
    record = {
        "owner_uid": os.getuid(),
        "owner": _user_name(),
        "recipe_sha256": recipe_sha256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(run_dir / IDENTITY_FILE, record)


def _foreign_paths(run_dir: Path, uid: int) -> list[str]:
    """Entries that make up the resume state but belong to another user."""
    ckpts = checkpoints_dir(run_dir)
    paths = [run_dir, run_dir / IDENTITY_FILE, ckpts]
    if ckpts.is_dir():
        paths += sorted(ckpts.iterdir())
    foreign = []
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_uid != uid:
            foreign.append(f"{path} (uid {st.st_uid})")
    return foreign


def check_run_identity(run_dir: Path, recipe_sha256: str, uid: int | None = None) -> None:
    """Refuse to resume a run directory this user did not create for this recipe.

    Call before resuming; a run directory without checkpoints passes (nothing to resume).

    Raises:
        ConfigError: naming the foreign owner or the differing recipe hash.
    """
    uid = os.getuid() if uid is None else uid
    has_checkpoints = checkpoints_dir(run_dir).is_dir() and any(checkpoints_dir(run_dir).iterdir())
    identity = read_identity(run_dir)
    if identity is None and not has_checkpoints:
        return
    foreign = _foreign_paths(run_dir, uid)
    if foreign:
        raise ConfigError(
            "training.output_dir",
            f"{run_dir} was not created by you: {', '.join(foreign[:4])} belong(s) to another "
            f"user; refusing to resume someone else's run. {_START_OVER}",
        )
    if identity is None:
        return  # an older run directory of this user: adopted (the record is written next)
    if identity.get("owner_uid") != uid:
        raise ConfigError(
            "training.output_dir",
            f"{run_dir / IDENTITY_FILE} records owner {identity.get('owner')!r} "
            f"(uid {identity.get('owner_uid')}), not you (uid {uid}); refusing to resume it. "
            f"{_START_OVER}",
        )
    if identity.get("recipe_sha256") != recipe_sha256:
        raise ConfigError(
            "training.output_dir",
            f"{run_dir} holds a run of another recipe (recorded hash "
            f"{str(identity.get('recipe_sha256'))[:12]}..., this recipe {recipe_sha256[:12]}...); "
            f"refusing to resume it. {_START_OVER}",
        )


def claim_run_dir(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Check (when resuming) and record that this user runs this recipe in ``run_dir``.

    Raises:
        ConfigError: the run directory belongs to someone else or to another recipe.
    """
    recipe = config_to_dict(cfg)
    free = RESUME_FREE_KEYS | {"training.output_dir"} | unset_added_keys(recipe)
    digest = recipe_hash(recipe, free)
    if cfg.training.resume:
        check_run_identity(run_dir, digest)
    write_identity(run_dir, digest)
