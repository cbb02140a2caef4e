#!/usr/bin/env bash
# FineWeb-Edu sample-10BT -> Megatron indexed datasets for the 270M / 0.7B / scale-up recipes.
#
#   bash examples/launch/preprocess_fineweb_edu.sh                      # stream from the hub
#   INPUT=/data/fineweb-edu/sample/10BT bash examples/launch/preprocess_fineweb_edu.sh   # local
#
# Writes ${OUTPUT_PREFIX}_text_document.{bin,idx}, ${OUTPUT_PREFIX}_valid_text_document.{bin,idx}
# and ${OUTPUT_PREFIX}_summary.json; rerunning resumes an interrupted run.
# Environment:
#   OUTPUT_PREFIX   default data/fineweb-edu-10BT (the recipes' data.train_prefixes)
#   INPUT           local parquet/jsonl files or directory instead of the hub (optional)
#   HF_CONFIG       hub config (default sample-10BT)
#   WORKERS         tokenizer processes (default: CPU count)
#   VALID_FRACTION  held-out document fraction (default 0.0005, ~5M tokens of 10B)
#   MAX_DOCS        stop after this many documents (optional)
#   DRY_RUN=1       verify the offline GPT-2 tokenizer and print the command, without reading data
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUTPUT_PREFIX="${OUTPUT_PREFIX:-data/fineweb-edu-10BT}"
WORKERS="${WORKERS:-$(nproc)}"
VALID_FRACTION="${VALID_FRACTION:-0.0005}"
args=(preprocess --output-prefix "$OUTPUT_PREFIX" --valid-fraction "$VALID_FRACTION"
  --workers "$WORKERS" --tokenizer gpt2)
if [ -n "${INPUT:-}" ]; then
  args+=(--input "$INPUT")
else
  args+=(--hf-dataset HuggingFaceFW/fineweb-edu --hf-config "${HF_CONFIG:-sample-10BT}")
fi
if [ -n "${MAX_DOCS:-}" ]; then args+=(--max-docs "$MAX_DOCS"); fi
args+=("$@")
if [ "${DRY_RUN:-0}" = "1" ]; then
  mqk tokenizer verify
  echo "would run: megatron-qk ${args[*]}"
  exit 0
fi
mkdir -p "$(dirname "$OUTPUT_PREFIX")"
exec "$PYTHON" -m megatron_qk.cli "${args[@]}"
