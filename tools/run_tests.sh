#!/usr/bin/env bash
# The README's test command: set up the pinned venv, lint, then run the whole test suite.
# LEG=py311 (default: Python 3.11, megatron-core 0.16.1, .venv) or LEG=py312 (Python 3.12,
# megatron-core 0.19.2, .venv-py312); see tools/setup_venv.sh and docs/VERSIONS.md.
# GPU-marked tests run where CUDA is available and are reported as skipped elsewhere.
# Extra arguments go to pytest; the exit status is pytest's (or the first failing step's).
set -euo pipefail
cd "$(dirname "$0")/.."
LEG="${LEG:-py311}"
case "$LEG" in
  py311) VENV="${VENV:-.venv}" ;;
  py312) VENV="${VENV:-.venv-py312}" ;;
  *) echo "run_tests: unknown LEG=$LEG (expected py311 or py312)" >&2; exit 2 ;;
esac
LEG="$LEG" VENV="$VENV" bash tools/setup_venv.sh
"$VENV/bin/ruff" check megatron_qk tests tools benchmarks
"$VENV/bin/ruff" format --check megatron_qk tests tools benchmarks
exec "$VENV/bin/python" -m pytest tests "$@"
