"""Every subcommand starts quiet: Megatron-Core's known start-up notices only with --verbose."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

NOTICE = "Transformer Engine and Apex are not installed"


def _export_stderr(tmp_path, *extra: str) -> str:
    # export imports megatron-core before it finds the checkpoint missing: the notices, if any,
    # are printed before its one-line error.
    argv = ["export", "--checkpoint", str(tmp_path / "missing"), "--format", "hf"]
    argv += ["--out", str(tmp_path / "out"), *extra]
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_qk.cli", *argv],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0 and "does not exist" in proc.stderr, proc.stderr
    return proc.stderr


def test_a_subcommand_without_its_own_verbose_flag_starts_quiet(tmp_path):
    err = _export_stderr(tmp_path)
    assert NOTICE not in err and "Traceback" not in err
    assert err.strip().count("\n") == 0, err  # the error line alone


def test_verbose_brings_the_notices_back(tmp_path):
    if importlib.util.find_spec("transformer_engine") or importlib.util.find_spec("apex"):
        return  # with TE or Apex installed megatron-core has no such notice to bring back
    assert NOTICE in _export_stderr(tmp_path, "--verbose")
