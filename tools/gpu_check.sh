#!/usr/bin/env bash
# One GPU check of the whole GPU path, sized for one H100/H200 in under 8 minutes.
#
#   bash tools/gpu_check.sh            # prints one JSON summary; exit 1 if any check failed
#
# Steps (each under its own time limit; a step that fails or times out is reported, the others
# still run):
#   1. the GPU-marked tests (pytest -m gpu)                                        <= 120 s
#   2. tools/gpu_check.py: TE vs local spec on the same weights (bf16 losses, rtol 1e-2), a
#      TE -> local checkpoint round trip, the TE dry run, cuda:1 (2-GPU hosts), and
#      benchmarks/step_time.py at 270M in bf16: tokens/s and MFU of our model vs stock
#      Megatron-Core GPTModel with the TE spec (the ratio is our split-Q/K/V cost against
#      stock fused linear_qkv)                                                     <= 210 s
#   3. benchmarks/rule_step_time.py: the upper_qk rule's step-time overhead at 270M <= 75 s
#   4. benchmarks/diag_overhead.py: the live diagnostics' overhead at 270M         <= 75 s
# Environment: PYTHON (default ./.venv/bin/python or python3), OUT (JSON files; default a
# temporary directory), PEAK_TFLOPS (dense bf16 peak per GPU, default 989 for H100/H200 SXM).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${OUT:-$(mktemp -d)}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
# The 270M recipe without its FineWeb-Edu files: synthetic tokens, one micro-batch of 8 per step.
SYNTH=(--set data.kind=synthetic --set data.train_prefixes=[] --set data.valid_prefixes=[]
       --set training.global_batch_size=8 --set training.micro_batch_size=8)

step() {  # step NAME SECONDS COMMAND...: run, keep its stdout as $OUT/NAME.json, log stderr
  local name="$1" limit="$2"; shift 2
  echo "gpu_check: $name (limit ${limit}s)" >&2
  timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
  local rc=$?
  [ "$rc" -eq 0 ] || echo "gpu_check: $name exited $rc (see $OUT/$name.log)" >&2
}

pytest_json() {  # the GPU-marked tests as one JSON record
  MQK_TEST_GPU=1 "$PYTHON" -m pytest tests -m gpu -q -p no:cacheprovider >"$OUT/pytest_gpu.log" 2>&1
  local rc=$?
  local tail; tail="$(tail -n 1 "$OUT/pytest_gpu.log" | tr -d '"\\')"
  local ok=false; [ "$rc" -eq 0 ] && ok=true
  printf '{"check": "pytest_gpu", "ok": %s, "rc": %d, "result": "%s"}\n' "$ok" "$rc" "$tail"
}

step pytest_gpu 120 bash -c "$(declare -f pytest_json); OUT='$OUT' PYTHON='$PYTHON' pytest_json"
step driver 210 "$PYTHON" tools/gpu_check.py --preset gpt-270m --peak-tflops "$PEAK_TFLOPS" \
  "${SYNTH[@]}"
step rule_step_time 75 "$PYTHON" benchmarks/rule_step_time.py --preset gpt-270m --steps 10 \
  --warmup 3 "${SYNTH[@]}"
step diag_overhead 75 "$PYTHON" benchmarks/diag_overhead.py --preset gpt-270m --reps 5 \
  --warmup 1 "${SYNTH[@]}"
"$PYTHON" tools/gpu_check.py --merge "$OUT"/pytest_gpu.json "$OUT"/driver.json \
  "$OUT"/rule_step_time.json "$OUT"/diag_overhead.json --out "$OUT/summary.json"
