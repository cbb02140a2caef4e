#!/usr/bin/env bash
# Run every arm and seed of one paper table in sequence, then print its comparison table(s).
#
#   TABLE=table1_gpt270m GPUS=8 bash examples/launch/run_table.sh [KEY=VALUE ...]
#
# A table is a directory under examples/configs/ holding one recipe per arm (or one
# sub-directory per architecture pair) and a `seeds` file. Run directories are
# runs/<table>/<group>/<arm>-s<seed>; finished runs (and runs stopped on purpose by
# training.stop_at_frac, e.g. Table 5) are skipped and interrupted ones resume. A run whose
# resolved config is identical to one already trained for another table (content hash, see
# megatron_qk/config/identity.py; e.g. the GPT-style seed-1 control) is linked, not retrained.
# Tables with an `eval_tasks` file (Table 1 -> Table 2) run `megatron-qk eval` after training.
# Environment:
#   TABLE     table directory name or path (required), e.g. table1_gpt270m, table3_components
#   SEEDS     seeds to run (default: the table's seeds file)
#   GPUS      processes per run (default: visible GPUs, or 1)
#   RUNS_DIR  where run directories go (default runs)
#   DRY_RUN=1 validate and build every recipe once (meta device) and list the planned runs
#   EVAL=0    skip the downstream evaluation of tables with an eval_tasks file
#   PYTHON    as in train.sh
set -euo pipefail
here="$(dirname "$0")"
source "$here/common.sh"
[ -n "${TABLE:-}" ] || die "set TABLE to a directory of examples/configs (e.g. table1_gpt270m)"
table_dir="$TABLE"
[ -d "$table_dir" ] || table_dir="$MQK_ROOT/examples/configs/$TABLE"
[ -d "$table_dir" ] || die "no table directory $TABLE (looked in examples/configs/)"
table_dir="$(cd "$table_dir" && pwd)"
name="$(basename "$table_dir")"
SEEDS="${SEEDS:-$(cat "$table_dir/seeds" 2>/dev/null || echo 1)}"
# Seeds come from a shared table folder or the environment: split them without globbing and
# accept integers only (a seed is also part of a run directory name).
mapfile -t seeds < <(tr -s ' \t\r' '\n' <<< "$SEEDS" | sed '/^$/d')
[ "${#seeds[@]}" -gt 0 ] || die "no seeds given (SEEDS or $table_dir/seeds)"
for seed in "${seeds[@]}"; do
  [[ "$seed" =~ ^[0-9]+$ ]] || die "seed '$seed' is not a non-negative integer (SEEDS or $table_dir/seeds)"
done
RUNS_DIR="${RUNS_DIR:-runs}"
mapfile -t recipes < <(find "$table_dir" -name '*.yaml' | sort)
[ "${#recipes[@]}" -gt 0 ] || die "$table_dir holds no recipes"
groups=()
run_state() { "$PYTHON" -m megatron_qk.rundir.config_hash --state "$1"; }
for recipe in "${recipes[@]}"; do
  rel="${recipe#"$table_dir"/}"
  group="$(dirname "$rel")"
  arm="$(basename "$rel" .yaml)"
  if [ "${DRY_RUN:-0}" = "1" ]; then
    echo "== $rel (seeds: ${seeds[*]})"
    report="$(CONFIG="$recipe" DRY_RUN=1 bash "$here/train.sh" "$@")"
    "$PYTHON" -c 'import json, sys
r = json.loads(sys.argv[1])
print("   {:,} parameters, {} steps, {:,} tokens".format(
    r["parameters"]["total"], r["planned_steps"], r["planned_tokens"]))' "$report"
  fi
  for seed in "${seeds[@]}"; do
    out="$RUNS_DIR/$name/$group/$arm-s$seed"
    out="${out//\/.\//\/}"
    hash="$("$PYTHON" -m megatron_qk.config.identity "$recipe" "training.seed=$seed" "$@")"
    index="$RUNS_DIR/.by_config/$hash"
    source_run=""
    if [ -f "$index" ]; then source_run="$(cat "$index")"; fi
    if [ "${DRY_RUN:-0}" = "1" ]; then
      if [ -n "$source_run" ] && [ "$source_run" != "$out" ]; then
        echo "   would reuse $source_run -> $out (identical resolved config $hash)"
      else
        echo "   would train -> $out"
      fi
      continue
    fi
    state="$(run_state "$out")"
    if [ "$state" = finished ] || [ "$state" = stopped ]; then
      echo "run_table.sh: $out $state, skipping"
    elif [ "$state" = absent ] && [ -n "$source_run" ] && [ "$source_run" != "$out" ] \
        && [[ "$(run_state "$source_run")" =~ ^(finished|stopped)$ ]]; then
      mkdir -p "$(dirname "$out")"
      ln -s "$(cd "$source_run" && pwd)" "$out"
      echo "run_table.sh: reusing $source_run for $out (identical resolved config, hash $hash)"
    else
      CONFIG="$recipe" SEED="$seed" OUTPUT_DIR="$out" bash "$here/train.sh" "$@"
    fi
    if [ ! -L "$out" ] && [ ! -f "$index" ] \
        && [[ "$(run_state "$out")" =~ ^(finished|stopped)$ ]]; then
      mkdir -p "$(dirname "$index")"
      echo "$out" > "$index"
    fi
    if [ -f "$table_dir/eval_tasks" ] && [ "${EVAL:-1}" = "1" ] && [ ! -f "$out/eval.json" ] \
        && [ "$(run_state "$out")" = finished ]; then
      mqk eval --checkpoint "$out" --tasks "$(tr -d '[:space:]' < "$table_dir/eval_tasks")"
    fi
  done
  groups+=("$RUNS_DIR/$name/$group")
done
[ "${DRY_RUN:-0}" = "1" ] && exit 0
mapfile -t unique_groups < <(printf '%s\n' "${groups[@]}" | sort -u)
for group in "${unique_groups[@]}"; do
  group="${group%/.}"
  echo "== $group"
  mqk compare "$group" --json "$group/compare.json" | tee "$group/compare.md" || true
done
