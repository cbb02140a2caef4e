"""Preflight: every check of a recipe that needs no training, run before any model is built.

``megatron-qk train --dry-run`` runs it (the launchers use the dry run as their gate) and a real
run runs it again in each process before building the model, so a recipe that cannot finish
fails in seconds, on the login node, with the offending key named, instead of after the model is
built on every GPU. Collected problems are reported together.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.extras import missing_extra
from megatron_qk.config.loader import locate
from megatron_qk.config.optim import LAYER_KEYWORDS, explicit_layers
from megatron_qk.config.schema import ExperimentConfig
from megatron_qk.data.validate import DataFileError, check_indexed_dataset
from megatron_qk.rundir.lock import RunDirBusyError, RunDirLock
from megatron_qk.rundir.previous import ExistingRunError, check_fresh_start


class PreflightError(ConfigError):
    """One or more recipe problems found before training; each names its key."""

    def __init__(self, problems: list[ConfigError]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0].path, problems[0].message)
        else:
            lines = "\n".join(f"  - {p}" for p in problems)
            super().__init__(problems[0].path, f"{len(problems)} problems:\n{lines}")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: str, key: str) -> ConfigError | None:
    """A directory that exists and is writable, or can be created under a writable parent.

    Writability is tried (a temporary file is created and removed), not read from permission
    bits, which say nothing for root, read-only mounts or ACLs.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        return ConfigError(key, f"{path} exists and is not a directory")
    base = _nearest_existing(target)
    if not base.is_dir():
        return ConfigError(key, f"{path} cannot be created: {base} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mqk-write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return ConfigError(key, f"{path} is not writable ({base}: {exc.strerror or exc})")
    return None


def _rule_problems(cfg: ExperimentConfig) -> list[ConfigError]:
    """Every bad value of the multiplier rules and the entropy floor, all reported at once.

    These checks live here, not in the config dataclasses' own validation, because the preflight
    lists every problem of a recipe in one message (``test_preflight_collects_every_problem``);
    a dataclass raises at its first. The library itself accepts an h0 above 1 (the floor is then
    always active); a launched recipe must not.
    """
    problems = []
    for i, rule in enumerate(cfg.optim.rules):
        where = f"optim.rules[{i}]"
        if rule.layers.strip() not in LAYER_KEYWORDS:
            try:
                explicit_layers(rule.layers, cfg.model.num_layers, f"{where}.layers")
            except ConfigError as exc:
                problems.append(exc)
        if rule.threshold < 0:
            problems.append(
                ConfigError(f"{where}.threshold", f"must be >= 0, got {rule.threshold}")
            )
    floor = cfg.optim.entropy_floor
    if floor.enabled:
        if floor.threshold < 0:
            problems.append(
                ConfigError("optim.entropy_floor.threshold", f"must be >= 0, got {floor.threshold}")
            )
        if not 0.0 <= floor.h0 <= 1.0:
            problems.append(
                ConfigError("optim.entropy_floor.h0", f"must be in [0, 1], got {floor.h0}")
            )
        if floor.lam < 0:
            problems.append(
                ConfigError("optim.entropy_floor.lam", f"must be >= 0, got {floor.lam}")
            )
        if floor.patience < 1:
            problems.append(
                ConfigError("optim.entropy_floor.patience", f"must be >= 1, got {floor.patience}")
            )
    return problems


def _data_problems(cfg: ExperimentConfig, scan_tokens: bool) -> list[ConfigError]:
    d = cfg.data
    if d.kind == "synthetic":
        if d.synthetic_vocab > cfg.model.vocab_size:
            return [ConfigError("data.synthetic_vocab", "must not exceed model.vocab_size")]
        return []
    problems = []
    for key, prefixes in (
        ("data.train_prefixes", d.train_prefixes),
        ("data.valid_prefixes", d.valid_prefixes),
    ):
        for i, prefix in enumerate(prefixes):
            try:
                check_indexed_dataset(
                    prefix, cfg.model.vocab_size, scan_tokens and d.check_token_ids
                )
            except (DataFileError, OSError) as exc:
                problems.append(ConfigError(f"{key}[{i}]", str(exc)))
    if d.cache_dir is not None:
        problem = check_writable_dir(d.cache_dir, "data.cache_dir")
        problems += [problem] if problem else []
    return problems


def _environment_problems(cfg: ExperimentConfig, check_device: bool) -> list[ConfigError]:
    import torch  # heavy: only the device checks need it

    problems = []
    if cfg.logging.wandb != "disabled":
        missing = missing_extra("wandb", f"{cfg.logging.wandb!r}")
        problems += [ConfigError("logging.wandb", str(missing))] if missing else []
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append(
            ConfigError("logging.tensorboard", "needs the tensorboard package (or set it false)")
        )
    if not check_device:
        return problems
    cuda = torch.cuda.is_available()
    if cfg.parallel.sequence_parallel:
        # Megatron's local spec uses torch LayerNorm without Apex, which refuses sequence
        # parallelism (torch_norm.py); TE's and Apex's norms support it. The collectives
        # themselves (sequence reduce-scatter/all-gather) also exist on gloo.
        te = cuda and cfg.model.impl != "local" and importlib.util.find_spec("transformer_engine")
        if not (te or importlib.util.find_spec("apex")):
            problems.append(
                ConfigError(
                    "parallel.sequence_parallel",
                    "needs the layer norms of Transformer Engine (model.impl auto/te on a GPU) "
                    "or Apex: Megatron's torch LayerNorm does not support it",
                )
            )
    if cfg.parallel.backend == "nccl" and not cuda:
        problems.append(ConfigError("parallel.backend", "nccl needs CUDA; use gloo or auto on CPU"))
    return problems


def run_dir_problems(cfg: ExperimentConfig, overwrite: bool, probe_lock: bool) -> list[ConfigError]:
    """The output directory: writable, not another run's (unless resuming/overwriting), free."""
    out = cfg.training.output_dir
    problem = check_writable_dir(out, "training.output_dir")
    if problem:
        return [problem]
    problems = []
    try:
        check_fresh_start(out, cfg.training.resume, overwrite)
    except ExistingRunError as exc:
        problems.append(ConfigError("training.resume", str(exc)))
    if probe_lock and Path(out).is_dir():
        lock = RunDirLock(out)
        try:
            lock.acquire()
        except RunDirBusyError as exc:
            problems.append(ConfigError("training.output_dir", str(exc)))
        finally:
            lock.release()
    return problems


def preflight(
    cfg: ExperimentConfig,
    world_size: int,
    overwrite: bool = False,
    scan_tokens: bool = True,
    probe_lock: bool = False,
    run_dir: bool = True,
    check_device: bool = True,
    check_data: bool = True,
) -> None:
    """Check everything about ``cfg`` that can be checked without training.

    Args:
        cfg: the loaded recipe (already type- and consistency-checked by the loader).
        world_size: the number of processes it will run on.
        overwrite: ``--overwrite`` was given (an earlier run may be moved aside).
        scan_tokens: scan token ids of indexed data (only one process per node need do it).
        probe_lock: also report a run directory that another training holds (dry run).
        run_dir: check the output directory (global rank 0 only: it owns the directory).
        check_device: check what needs this machine's software or accelerator (NCCL, the norms
            sequence parallelism needs); off for a dry run, which may run on a login node.
        check_data: check the data files (off only for a dry run planning a run before its
            data exists).

    Raises:
        PreflightError: listing every problem found, each naming its key.
    """
    problems: list[ConfigError] = []
    try:
        cfg.validate_world(world_size)
    except ConfigError as exc:
        problems.append(exc)
    problems += _rule_problems(cfg)
    if check_data:
        problems += _data_problems(cfg, scan_tokens)
    problems += _environment_problems(cfg, check_device)
    if run_dir:
        problems += run_dir_problems(cfg, overwrite, probe_lock)
    if problems:
        raise PreflightError([locate(p, cfg) for p in problems])  # + file:line of each key
