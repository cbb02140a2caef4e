# Shared helpers of the launch scripts (sourced, not run). Needs bash >= 4.4 (mapfile -d, empty
# arrays under set -u).
if [ "${BASH_VERSINFO[0]}" -lt 4 ] || { [ "${BASH_VERSINFO[0]}" -eq 4 ] && [ "${BASH_VERSINFO[1]}" -lt 4 ]; }; then
  echo "megatron-qk launch scripts need bash >= 4.4 (this is $BASH_VERSION)" >&2
  exit 2
fi
# The Python that has megatron_qk installed: $PYTHON, else the repo's .venv, else python3.
MQK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$MQK_ROOT/.venv/bin/python" ]; then PYTHON="$MQK_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mqk() { "$PYTHON" -m megatron_qk.cli "$@"; }

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# Visible GPUs on this node: CUDA_VISIBLE_DEVICES when set, else nvidia-smi (0 without either).
count_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    local -a devices
    IFS=',' read -r -a devices <<< "$CUDA_VISIBLE_DEVICES"
    echo "${#devices[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# Fill the global array OVERRIDES from SEED / OUTPUT_DIR (plus any KEY=VALUE arguments).
build_overrides() {
  OVERRIDES=()
  if [ -n "${SEED:-}" ]; then OVERRIDES+=("training.seed=$SEED"); fi
  if [ -n "${OUTPUT_DIR:-}" ]; then OVERRIDES+=("training.output_dir=$OUTPUT_DIR"); fi
  OVERRIDES+=("$@")
}

# "--set a=1 b=2" or nothing (argparse needs at least one value after --set).
set_flags() {
  if [ "$#" -gt 0 ]; then printf '%s\0' --set "$@"; fi
}
