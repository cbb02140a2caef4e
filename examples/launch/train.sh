#!/usr/bin/env bash
# Single-node training with torchrun (one process per GPU).
#
#   CONFIG=examples/configs/table1_gpt270m/intervention.yaml GPUS=8 SEED=1 \
#     bash examples/launch/train.sh [KEY=VALUE ...]
#
# Environment:
#   CONFIG      recipe YAML or preset name (required)
#   GPUS        processes on this node (default: visible GPUs, or 1 on a CPU machine)
#   SEED        training.seed override (optional)
#   OUTPUT_DIR  training.output_dir override (optional; the recipe names one)
#   DRY_RUN=1   validate the recipe for GPUS processes and build the model on the meta device
#               (parameter counts, planned steps), without training
#   PYTHON      interpreter with megatron_qk installed (default: ./.venv/bin/python or python3)
# Extra KEY=VALUE arguments are recipe overrides (same as --set).
set -euo pipefail
source "$(dirname "$0")/common.sh"
[ -n "${CONFIG:-}" ] || die "set CONFIG to a recipe (e.g. examples/configs/table1_gpt270m/control.yaml)"
GPUS="${GPUS:-$(count_gpus)}"
[ "$GPUS" -ge 1 ] 2>/dev/null || GPUS=1
build_overrides "$@"
mapfile -d '' SET < <(set_flags "${OVERRIDES[@]}")
if [ "${DRY_RUN:-0}" = "1" ]; then
  exec "$PYTHON" -m megatron_qk.cli train "$CONFIG" --dry-run --no-data-check --nproc-per-node "$GPUS" "${SET[@]}"
fi
# Validate before starting GPUS processes: a bad key fails here once, with its file:line.
mqk train "$CONFIG" --dry-run --nproc-per-node "$GPUS" "${SET[@]}" >/dev/null
echo "train.sh: $CONFIG on $GPUS process(es) ${OVERRIDES[*]}"
# Kernels in issue order so TP/SP communication overlaps the GEMMs (Megatron warns otherwise).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
exec "$PYTHON" -m megatron_qk.training.torchrun --standalone --nproc-per-node "$GPUS" \
  -m megatron_qk.train "$CONFIG" "${SET[@]}"
