#!/usr/bin/env bash
#SBATCH --job-name=megatron-qk
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%j.out
# 120 s before the time limit every training process gets SIGUSR1: it finishes its step, saves a
# checkpoint, logs a `preempted` event and exits 75; this script then requeues the job, which
# resumes from that checkpoint (scancel/preemption SIGTERM takes the same path).
#SBATCH --signal=USR1@120
#SBATCH --requeue
# Multi-node training: srun starts one torchrun per node; a static rendezvous (node rank =
# SLURM_NODEID, the store on the first node of the allocation, a random port per job) starts
# GPUS_PER_NODE processes on each. torch's c10d rendezvous backend is not used: it unpickles state
# that anyone reaching the first node could write. The cluster network must still be trusted
# (docs/SECURITY.md).
#
#   CONFIG=examples/configs/scaleup_gpt2.7b/intervention.yaml sbatch --nodes 4 \
#     examples/launch/train_slurm.sh [KEY=VALUE ...]
#
# Environment:
#   CONFIG         recipe YAML or preset name (required)
#   GPUS_PER_NODE  processes per node (default 8)
#   NODES          nodes (default: $SLURM_NNODES, else 2)
#   MASTER_PORT    rendezvous port on the first node (default: random in 20000-59999 per job)
#   SEED, OUTPUT_DIR, PYTHON   as in train.sh
#   CONTAINER      optional container image for srun (pyxis/enroot: --container-image); set
#                  PYTHON to the interpreter inside the image (e.g. PYTHON=python)
#   MQK_ROOT       repository checkout (default: the sbatch submission directory)
#   DRY_RUN=1      validate the recipe for NODES x GPUS_PER_NODE processes, build the model on the
#                  meta device and print the srun command, without SLURM or GPUs
set -euo pipefail
# sbatch runs a copy of this script from the spool directory: find the checkout from MQK_ROOT,
# else the submission directory (submit from the repository root), else this file's location.
launch_dir="$(dirname "$0")"
if [ ! -f "$launch_dir/common.sh" ]; then
  launch_dir="${MQK_ROOT:-${SLURM_SUBMIT_DIR:-.}}/examples/launch"
fi
[ -f "$launch_dir/common.sh" ] || {
  echo "train_slurm.sh: cannot find examples/launch/common.sh; submit from the repository root or set MQK_ROOT" >&2
  exit 2
}
source "$launch_dir/common.sh"
[ -n "${CONFIG:-}" ] || die "set CONFIG to a recipe"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NODES="${NODES:-${SLURM_NNODES:-2}}"
MASTER_PORT="${MASTER_PORT:-$((20000 + $(od -An -N2 -tu2 /dev/urandom) % 40000))}"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && [ "$MASTER_PORT" -ge 1024 ] && [ "$MASTER_PORT" -le 65535 ] \
  || die "MASTER_PORT must be a port number in 1024-65535, got '$MASTER_PORT'"
build_overrides "$@"
mapfile -d '' SET < <(set_flags "${OVERRIDES[@]}")
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
else
  MASTER_ADDR="${MASTER_ADDR:-<first node of the allocation>}"
fi
container=()
if [ -n "${CONTAINER:-}" ]; then
  container=(--container-image "$CONTAINER" --container-mounts "$MQK_ROOT:$MQK_ROOT" --container-workdir "$MQK_ROOT")
fi
# Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: pass it on explicitly.
cpus=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then cpus=(--cpus-per-task "$SLURM_CPUS_PER_TASK"); fi
cmd=(srun --nodes "$NODES" --ntasks-per-node 1 "${cpus[@]}" "${container[@]}"
  bash -c 'PET_NODE_RANK="$SLURM_NODEID" exec "$@"' node-rank
  "$PYTHON" -m megatron_qk.training.torchrun --nnodes "$NODES" --nproc-per-node "$GPUS_PER_NODE"
  --rdzv-backend static --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  -m megatron_qk.train "$CONFIG" "${SET[@]}")
if [ "${DRY_RUN:-0}" = "1" ]; then
  mqk train "$CONFIG" --dry-run --no-data-check --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NODES" "${SET[@]}"
  echo "would run: ${cmd[*]}"
  exit 0
fi
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM allocation: submit with sbatch (or DRY_RUN=1)"
mqk train "$CONFIG" --dry-run --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NODES" "${SET[@]}" >/dev/null
export CUDA_DEVICE_MAX_CONNECTIONS=1
echo "train_slurm.sh: $CONFIG on $NODES x $GPUS_PER_NODE, rendezvous $MASTER_ADDR:$MASTER_PORT"
# megatron_qk.training.torchrun is torchrun whose launcher ignores SIGUSR1 (left to the trainers)
# and exits 75 when the trainers stopped for preemption.
rc=0
"${cmd[@]}" || rc=$?
if [ "$rc" -eq 75 ]; then
  echo "train_slurm.sh: preempted at a checkpoint; requeueing job $SLURM_JOB_ID" >&2
  "${SCONTROL:-scontrol}" requeue "$SLURM_JOB_ID"
fi
exit "$rc"
