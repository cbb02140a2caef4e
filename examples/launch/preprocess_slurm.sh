#!/usr/bin/env bash
# Sharded preprocessing: a SLURM job array of N `preprocess --shard I/N` tasks, then one
# `merge-datasets` job that starts when every shard succeeded (--dependency=afterok).
#
#   SHARDS=16 INPUT='/data/fineweb-edu/sample/350BT/*.parquet' \
#     OUTPUT_PREFIX=/data/fwe350 bash examples/launch/preprocess_slurm.sh
#   DRY_RUN=1 SHARDS=16 ... bash examples/launch/preprocess_slurm.sh   # print both sbatch commands
#   LOCAL=1 SHARDS=2 ... bash examples/launch/preprocess_slurm.sh      # shards as local processes
#
# Shard I writes ${OUTPUT_PREFIX}_shardI_*; the merge writes ${OUTPUT_PREFIX}_text_document,
# ${OUTPUT_PREFIX}_valid_text_document and ${OUTPUT_PREFIX}_summary.json, the same files as one
# job. A failed or preempted shard is resumed by resubmitting it (same command); rerunning this
# script resubmits every shard, finished ones return at once.
# Environment:
#   SHARDS          number of shards N (default 16; at most the number of input files)
#   OUTPUT_PREFIX   default data/fineweb-edu
#   INPUT           local files, directory or glob (quoted); unset: the hub dataset
#   HF_CONFIG       hub config when INPUT is unset (default sample-350BT)
#   VALID_FRACTION  held-out document fraction (default 0.0005)
#   CPUS_PER_TASK   CPUs of each shard task, also its tokenizer workers (default 16)
#   SBATCH_ARGS     extra sbatch options for both jobs (partition, account, time), e.g. "-p cpu"
#   EXTRA_ARGS      extra preprocess options
#   DRY_RUN=1       print the sbatch commands instead of submitting them
#   LOCAL=1         run the shards as parallel processes on this machine, then merge
set -euo pipefail
source "$(dirname "$0")/common.sh"
SHARDS="${SHARDS:-16}"
OUTPUT_PREFIX="${OUTPUT_PREFIX:-data/fineweb-edu}"
VALID_FRACTION="${VALID_FRACTION:-0.0005}"
CPUS_PER_TASK="${CPUS_PER_TASK:-16}"
[[ "$SHARDS" =~ ^[1-9][0-9]*$ ]] || die "SHARDS must be a positive integer, got '$SHARDS'"

args=(preprocess --valid-fraction "$VALID_FRACTION" --tokenizer gpt2 --no-progress)
if [ -n "${INPUT:-}" ]; then
  args+=(--input "$INPUT")  # a quoted glob is expanded by preprocess, in sorted order
else
  args+=(--hf-dataset HuggingFaceFW/fineweb-edu --hf-config "${HF_CONFIG:-sample-350BT}")
fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
args+=("${extra[@]}")
shard_prefixes=()
for ((i = 0; i < SHARDS; i++)); do shard_prefixes+=("${OUTPUT_PREFIX}_shard$i"); done
merge=(merge-datasets "${shard_prefixes[@]}" --output-prefix "$OUTPUT_PREFIX" --verify)

if [ "${LOCAL:-0}" = "1" ]; then
  mkdir -p "$(dirname "$OUTPUT_PREFIX")"
  pids=()
  for ((i = 0; i < SHARDS; i++)); do
    mqk "${args[@]}" --shard "$i/$SHARDS" --output-prefix "${shard_prefixes[$i]}" &
    pids+=($!)
  done
  failed=0
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || { echo "shard $i/$SHARDS failed" >&2; failed=1; }; done
  [ "$failed" = 0 ] || die "a shard failed; rerun this command to resume the unfinished ones"
  mqk "${merge[@]}"
  exit 0
fi

# The array task's index is only known inside the task: keep ${SLURM_ARRAY_TASK_ID} unexpanded.
task="$(printf '%q ' "$PYTHON" -m megatron_qk.cli "${args[@]}" --workers "$CPUS_PER_TASK")"
task+="--shard \${SLURM_ARRAY_TASK_ID}/$SHARDS --output-prefix $(printf '%q' "$OUTPUT_PREFIX")_shard\${SLURM_ARRAY_TASK_ID}"
read -r -a sbatch_extra <<< "${SBATCH_ARGS:-}"
array=(sbatch --parsable --job-name=mqk-preprocess --array="0-$((SHARDS - 1))"
  --cpus-per-task="$CPUS_PER_TASK" "${sbatch_extra[@]}" --wrap "$task")
merge_cmd="$(printf '%q ' "$PYTHON" -m megatron_qk.cli "${merge[@]}")"
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "would run: ${array[*]:0:${#array[@]}-1} \"$task\""
  echo "would run: sbatch --parsable --job-name=mqk-merge --dependency=afterok:ARRAY_JOB_ID" \
    "${sbatch_extra[@]}" --wrap "\"$merge_cmd\""
  exit 0
fi
command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run on a SLURM login node (or LOCAL=1)"
mkdir -p "$(dirname "$OUTPUT_PREFIX")"
array_id="$("${array[@]}")"
merge_id="$(sbatch --parsable --job-name=mqk-merge --dependency="afterok:${array_id%%;*}" \
  "${sbatch_extra[@]}" --wrap "$merge_cmd")"
echo "submitted shard array $array_id ($SHARDS tasks) and merge job $merge_id"
