"""Static checks of the Docker build (docker is not needed): context, user, constraints, pins."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
sys.path.insert(0, str(ROOT / "docker"))
sys.path.insert(0, str(ROOT / "tools"))


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes (parents count too)."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/").removeprefix("**/")
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p.split("/")[-1], pat) for p in prefixes):
            ignored = not negate
    return ignored


def _dockerignore() -> list[str]:
    text = (ROOT / ".dockerignore").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_dockerignore_is_an_allowlist():
    patterns = _dockerignore()
    assert patterns[0] == "*", "the first rule must exclude everything"
    outside = (".venv/bin/python", "data/x.bin", "runs/r/checkpoints/latest", ".git/config",
               "quickstart-out/report.md", "megatron_qk/__pycache__/cli.pyc", ".env")  # fmt: skip
    for secret in outside:
        assert _ignored(secret, patterns), secret
    for needed in ("setup.py", "megatron_qk/cli.py", "tools/setup_venv.sh",
                   "requirements/constraints-cpu.txt", "docker/check_ngc_stack.py"):  # fmt: skip
        assert not _ignored(needed, patterns), needed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_non_root_user(dockerfile):
    lines = [ln.strip() for ln in dockerfile.read_text().splitlines()]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), "the last USER must not be root"
    last_user = max(i for i, ln in enumerate(lines) if ln.startswith("USER "))
    assert any(ln.startswith("CMD") for ln in lines[last_user:])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_taken_from_the_pinnable_arg(dockerfile):
    """Every FROM uses ``ARG FROM_IMAGE``, the one line tools/pin_base_images.py pins."""
    text = dockerfile.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == ["${FROM_IMAGE}"]
    assert len(re.findall(r"^ARG FROM_IMAGE=\S+$", text, flags=re.M)) == 1


def test_pin_tool_writes_digest_and_tag_comment(tmp_path):
    digest = "sha256:" + "ab" * 32
    for dockerfile in DOCKERFILES:
        copy = tmp_path / dockerfile.name
        copy.write_text(dockerfile.read_text())
        for _ in range(2):  # re-pinning replaces the pin instead of stacking comments
            subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "tools" / "pin_base_images.py"),
                    str(copy),
                    "--digest",
                    digest,
                ],  # fmt: skip
                check=True,
                capture_output=True,
            )
        lines = copy.read_text().splitlines()
        (i,) = [i for i, ln in enumerate(lines) if ln.startswith("ARG FROM_IMAGE=")]
        tag = lines[i].split("=", 1)[1].split("@")[0]
        assert lines[i] == f"ARG FROM_IMAGE={tag}@{digest}"
        assert lines[i - 1] == f"# base image tag: {tag}"
        assert sum(ln.startswith("# base image tag:") for ln in lines) == 1
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "pin_base_images.py"), str(copy), "--digest", "x"],
        capture_output=True,
    )
    assert bad.returncode != 0


def test_gpu_image_keeps_ngc_constraints_and_checks_the_stack():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert 'PIP_CONSTRAINT=""' not in text and "PIP_CONSTRAINT= " not in text
    assert "ENV PIP_CONSTRAINT=/etc/pip/megatron-qk-constraint.txt" in text
    assert 'ARG TE_RANGE=">=2.9.0a0,<2.12"' in text
    record = text.index("check_ngc_stack.py record")
    install = text.index('pip install --no-cache-dir --no-build-isolation "megatron-core==')
    check = text.index("pip check")
    verify = text.index("check_ngc_stack.py verify")
    assert record < install < check < verify
    assert '--te-range "${TE_RANGE}"' in text[verify:]


def test_relax_constraints_drops_only_named_lines_and_never_torch(tmp_path):
    from relax_constraints import main

    source = tmp_path / "constraint.txt"
    source.write_text(
        "torch==2.9.0a0+nv\nTransformer_Engine==2.10.0\nnumpy==1.26.4\n# c\nidna==3.7\n"
    )
    out = tmp_path / "out.txt"
    assert main(["--source", str(source), "--relax", "NumPy", "--out", str(out)]) == 0
    assert out.read_text() == "torch==2.9.0a0+nv\nTransformer_Engine==2.10.0\n# c\nidna==3.7\n"
    assert main(["--source", str(source), "--relax", "torch", "--out", str(out)]) == 2
    assert main(["--source", str(source), "--relax", "transformer-engine", "--out", str(out)]) == 2
    assert main(["--source", str(source), "--relax", "absent", "--out", str(out)]) == 2
    assert main(["--source", str(tmp_path / "none.txt"), "--out", str(out)]) == 2


def test_stack_check_fails_when_torch_was_replaced(tmp_path):
    from check_ngc_stack import installed_stack, main, te_version_problem

    record = tmp_path / "stack.json"
    assert main(["record", str(record)]) == 0
    assert main(["verify", str(record)]) == 0
    stack = json.loads(record.read_text())
    assert "torch" in stack
    stack["torch"]["version"] = "2.9.0a0+ngc"  # what NGC had before pip replaced it
    record.write_text(json.dumps(stack))
    assert main(["verify", str(record)]) == 1
    assert installed_stack()["torch"] != stack["torch"]
    assert (
        te_version_problem({"transformer-engine": {"version": "2.10.0+abc"}}, ">=2.9.0a0,<2.12")
        is None
    )
    assert "outside" in te_version_problem(
        {"transformer-engine": {"version": "2.8.0"}}, ">=2.9.0a0,<2.12"
    )
    assert "outside" in te_version_problem(
        {"transformer-engine": {"version": "2.12.0"}}, ">=2.9.0a0,<2.12"
    )
    assert "not installed" in te_version_problem({}, ">=2.9.0a0,<2.12")
