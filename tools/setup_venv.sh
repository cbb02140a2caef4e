#!/usr/bin/env bash
# Create (or update) ./.venv with pinned packages and megatron-qk installed in editable mode.
# CPU machines get the CPU build of torch 2.13.0 first, so megatron-core does not pull CUDA wheels.
# Usage: bash tools/setup_venv.sh [extra pip args]   (VENV=path to use another location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.megatron-qk-installed"
want="$(cat setup.py requirements/constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup_venv: $VENV is up to date"
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # On a GPU machine use the NGC container instead (docker/Dockerfile); this installs the CPU build
  # when the index offers it (outside CI: add --index-url https://download.pytorch.org/whl/cpu).
  "${PIP[@]}" install -q "torch==2.13.0" "$@"
fi
# The eval and export extras (lm-evaluation-harness, transformers) are part of the tested install:
# tests/test_eval.py and tests/test_export.py need them.
"${PIP[@]}" install -q -c requirements/constraints-cpu.txt -e ".[dev,eval,export]" "$@"
echo "$want" > "$stamp"
echo "setup_venv: ready ($("$VENV/bin/python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null))"
