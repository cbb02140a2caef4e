#!/usr/bin/env bash
# The README's test command: set up the pinned venv, lint, then run the whole test suite.
# GPU-marked tests run where CUDA is available and are reported as skipped elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
.venv/bin/ruff check megatron_qk tests tools benchmarks
.venv/bin/ruff format --check megatron_qk tests tools benchmarks
exec .venv/bin/python -m pytest tests "$@"
