#!/usr/bin/env bash
# Run every arm and seed of one paper table in sequence, then print its tables.
#
#   TABLE=table1_gpt270m GPUS=8 bash examples/launch/run_table.sh [KEY=VALUE ...]
#   TABLE=all DRY_RUN=1 bash examples/launch/run_table.sh      # plan and cost of every table
#
# A table is a directory under examples/configs/ holding one recipe per arm (or one
# sub-directory per architecture pair), a `seeds` file and an `analysis` file (the megatron-qk
# commands that print the paper's table from the runs). Run directories are
# runs/<table>/<group>/<arm>-s<seed>; finished runs (and runs stopped on purpose by
# training.stop_at_frac, e.g. Table 5) are skipped and interrupted ones resume. A run whose
# resolved config is identical apart from labels to one already trained for another table (e.g.
# the GPT-style seed-1 control, or Table 9's `adaptive` = Table 1's `intervention`) is linked,
# not retrained (`megatron-qk table`, megatron_qk/analysis/table_runner.py). Tables with an `eval_tasks` file
# (Table 1 -> Table 2) run `megatron-qk eval` after training. A table command that cannot
# produce its table fails the script (exit 2) with the reason.
# Environment:
#   TABLE     table directory name or path (required), e.g. table1_gpt270m; `all` with DRY_RUN=1
#   SEEDS     seeds to run (default: the table's seeds file)
#   GPUS      processes per run (default: visible GPUs, or 1)
#   RUNS_DIR  where run directories go (default runs)
#   DRY_RUN=1 validate and build every recipe once (meta device), list the planned runs (trained
#             or linked) and their GPU-hours (MFU=0.4 and PEAK_TFLOPS=989 by default)
#   SMOKE=1   every recipe on the CPU in one process, model shrunk to a tiny shape and 20 steps,
#             every other setting kept (rules, floor, fixed releases, multipliers, stop_at_frac,
#             evaluation grid); synthetic data; the downstream evaluation offline with a
#             character tokenizer and stand-in tasks (plumbing only); then the analysis
#   SEPARATE_RUNS=1  train arms identical to another table's run apart from their label as
#             separate runs (default: linked)
#   EVAL=0    skip the downstream evaluation of tables with an eval_tasks file
#   PYTHON    as in train.sh
set -euo pipefail
here="$(dirname "$0")"
source "$here/common.sh"
export PYTHON
[ -n "${TABLE:-}" ] || die "set TABLE to a directory of examples/configs (e.g. table1_gpt270m)"
RUNS_DIR="${RUNS_DIR:-runs}"
opts=(--runs-dir "$RUNS_DIR")
if [ -n "${SEEDS:-}" ]; then opts+=(--seeds "$SEEDS"); fi
if [ "${SEPARATE_RUNS:-0}" = "1" ]; then opts+=(--separate); fi
plan_opts=("${opts[@]}" --plan --mfu "${MFU:-0.4}" --peak "${PEAK_TFLOPS:-989}")
if [ "$TABLE" = all ]; then
  [ "${DRY_RUN:-0}" = "1" ] || die "TABLE=all is for DRY_RUN=1 (the plan); run tables one by one"
  exec "$PYTHON" -m megatron_qk.cli table all "${plan_opts[@]}" "$@"
fi
table_dir="$TABLE"
[ -d "$table_dir" ] || table_dir="$MQK_ROOT/examples/configs/$TABLE"
[ -d "$table_dir" ] || die "no table directory $TABLE (looked in examples/configs/)"
table_dir="$(cd "$table_dir" && pwd)"
if [ "${DRY_RUN:-0}" = "1" ]; then
  mapfile -t recipes < <(find "$table_dir" -name '*.yaml' | sort)
  [ "${#recipes[@]}" -gt 0 ] || die "$table_dir holds no recipes"
  for recipe in "${recipes[@]}"; do
    echo "== ${recipe#"$table_dir"/}"
    report="$(CONFIG="$recipe" DRY_RUN=1 bash "$here/train.sh" "$@")"
    "$PYTHON" -c 'import json, sys
r = json.loads(sys.argv[1])
steps = r["evaluation_steps"]
print("   {:,} parameters, {} steps, {:,} tokens, {} evaluations (steps {} ... {})".format(
    r["parameters"]["total"], r["planned_steps"], r["planned_tokens"], len(steps),
    ", ".join(map(str, steps[:8])), steps[-1]))' "$report"
  done
  "$PYTHON" -m megatron_qk.cli table "$table_dir" --dry-run "${opts[@]}" "$@"
  exec "$PYTHON" -m megatron_qk.cli table "$table_dir" "${plan_opts[@]}" "$@"
fi
if [ "${SMOKE:-0}" = "1" ]; then opts+=(--smoke); fi
exec "$PYTHON" -m megatron_qk.cli table "$table_dir" "${opts[@]}" "$@"
