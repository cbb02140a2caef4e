#!/usr/bin/env bash
# Create (or update) a venv with pinned packages and megatron-qk installed in editable mode.
# Two tested legs (docs/VERSIONS.md), chosen by LEG:
#   LEG=py311 (default): Python 3.11, megatron-core 0.16.1, requirements/constraints-cpu.txt, .venv
#   LEG=py312: Python 3.12, megatron-core 0.19.2, requirements/constraints-py312.txt, .venv-py312
# The py311 leg installs torch 2.13.0 first, so megatron-core does not pull other CUDA wheels; on
# Python 3.12 the registry's torch 2.13.0 is the CUDA build (about 2.6 GB), which runs on the CPU.
# Usage: [LEG=py312] bash tools/setup_venv.sh [extra pip args]
#   (VENV=path to use another location, PYTHON=interpreter to use another Python)
set -euo pipefail
cd "$(dirname "$0")/.."
LEG="${LEG:-py311}"
case "$LEG" in
  py311)
    VENV="${VENV:-.venv}"
    CONSTRAINTS=requirements/constraints-cpu.txt
    want_py=3.11
    ;;
  py312)
    VENV="${VENV:-.venv-py312}"
    CONSTRAINTS=requirements/constraints-py312.txt
    want_py=3.12
    ;;
  *)
    echo "setup_venv: unknown LEG=$LEG (expected py311 or py312)" >&2
    exit 2
    ;;
esac
if [ -z "${PYTHON:-}" ]; then
  # python3.X on PATH, else a pyenv-installed 3.X (pyenv's shims hide versions not selected).
  if command -v "python$want_py" >/dev/null 2>&1 && "python$want_py" -c "" 2>/dev/null; then
    PYTHON="python$want_py"
  elif command -v pyenv >/dev/null 2>&1 \
    && ver="$(pyenv versions --bare | grep -E "^$want_py(\.[0-9]+)?$" | sort -V | tail -1)" \
    && [ -n "$ver" ]; then
    PYTHON="$(PYENV_VERSION="$ver" pyenv which python3)"
  else
    PYTHON=python3
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
have_py="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$have_py" != "$want_py" ]; then
  echo "setup_venv: LEG=$LEG needs Python $want_py but $VENV has $have_py" \
    "(set PYTHON=/path/to/python$want_py, remove $VENV)" >&2
  exit 2
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.megatron-qk-installed"
want="$(cat setup.py "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup_venv: $VENV ($LEG) is up to date"
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # On a GPU machine use the NGC container instead (docker/Dockerfile); this installs the CPU build
  # when the index offers it (outside CI: add --index-url https://download.pytorch.org/whl/cpu).
  "${PIP[@]}" install -q -c "$CONSTRAINTS" "torch==2.13.0" "$@"
fi
# The eval and export extras (lm-evaluation-harness, transformers) are part of the tested install:
# tests/test_eval.py and tests/test_export.py need them.
"${PIP[@]}" install -q -c "$CONSTRAINTS" -e ".[dev,eval,export]" "$@"
echo "$want" > "$stamp"
echo "setup_venv: ready ($LEG: $("$VENV/bin/python" -c 'import sys, torch, megatron.core as m; print("Python", sys.version.split()[0], "torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null))"
