"""Static checks that ``tools/gpu_check.sh`` can run in the GPU image (docker is not needed), and
that the image's version defaults are the documented row of docs/DOCKER.md."""

from __future__ import annotations

import re
from pathlib import Path

from test_docker_static import _dockerignore, _ignored

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def _copied_dirs() -> set[str]:
    """Top-level paths the image copies from the build context."""
    out = set()
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            out.update(p.rstrip("/").split("/")[0] for p in line.split()[1:-1])
    return out


def _paths_gpu_check_runs() -> set[str]:
    """Repository files tools/gpu_check.sh and its driver execute or import."""
    text = (ROOT / "tools" / "gpu_check.sh").read_text()
    files = set(re.findall(r"\b((?:tools|benchmarks)/[\w/]+\.py)\b", text))
    driver = (ROOT / "tools" / "gpu_check.py").read_text()
    files |= {f"benchmarks/{m}.py" for m in re.findall(r"from benchmarks import (\w+)", driver)}
    files |= {"benchmarks/resume_equality.py", "tools/gpu_check_numerics.py"}
    if "-m pytest tests" in text:
        files |= {"tests/conftest.py", "tests/test_gpu.py", "tests/gpu_twins.py"}
    return files


def test_the_image_carries_everything_gpu_check_runs():
    copied, ignore = _copied_dirs(), _dockerignore()
    needed = _paths_gpu_check_runs()
    assert {"tests/test_gpu.py", "benchmarks/step_time.py", "tools/gpu_check.py"} <= needed
    for path in sorted(needed):
        assert (ROOT / path).is_file(), path
        assert path.split("/")[0] in copied, f"docker/Dockerfile does not COPY {path}"
        assert not _ignored(path, ignore), f".dockerignore drops {path}"


def test_the_image_installs_the_dev_extra_with_pytest():
    install = re.search(r'pip install [^\n]*-e "\.\[([\w,]+)\]"', DOCKERFILE)
    assert install and "dev" in install.group(1).split(","), "gpu_check.sh runs pytest"
    setup = (ROOT / "setup.py").read_text()
    assert re.search(r'"dev": \[[^\]]*"pytest', setup)


def test_dockerfile_defaults_are_the_documented_default_row():
    args = dict(re.findall(r'^ARG (\w+)=("[^"]*"|\S+)', DOCKERFILE, flags=re.M))
    doc = (ROOT / "docs" / "DOCKER.md").read_text()
    (row,) = [ln for ln in doc.splitlines() if ln.startswith("|") and "(default)" in ln]
    cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
    assert cells[0].split()[0] == args["MEGATRON_CORE_VERSION"]
    assert cells[1] == args["FROM_IMAGE"].split("@")[0]
    assert cells[2] == args["TE_RANGE"].strip('"')
