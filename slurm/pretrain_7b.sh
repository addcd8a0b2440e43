#!/usr/bin/env bash
# Pretrain Transfusion 7B on a SLURM GPU cluster. Submit from the repository checkout:
#   cd /path/to/checkout && sbatch slurm/pretrain_7b.sh
#
# sbatch runs a copy of this script from slurmd's spool folder, in the folder sbatch ran in
# (SLURM_SUBMIT_DIR). The checkout is REPO if set, else the submit folder or the nearest folder
# above it that holds this repository; submitted from elsewhere, the job stops with one line.
# The log, <job-name>-<job id>.out (stdout and stderr), is written in the submit folder itself, not
# in a subfolder: SLURM opens it before the script starts and fails the job without any log when
# its folder does not exist.
#
# One task per node; each runs slurm/launch_node.sh, which starts torchrun (c10d rendezvous on the
# first node) with one trainer per GPU. Ten minutes before the time limit SLURM sends USR1 to every
# process of the job step (--signal without B:): torchrun's agent ignores it, the launcher passes it
# on, the trainers finish their step, save a checkpoint, leave a REQUEUE marker and exit 0, and this
# script requeues the job, which resumes from the latest checkpoint (checkpoint.resume=auto). USR1
# or TERM sent to this batch shell alone (--signal=B:USR1@600, scancel --batch) goes to the step
# through srun. Before any node starts, the config is validated once here: a mistake ends the job
# with one `config error: ...` line.
#
# Override with environment variables, e.g.
#   CONFIG=configs/1.4b.yaml OUTPUT_DIR=/checkpoints/run1 EXTRA_ARGS="optim.lr=2e-4" sbatch --nodes 8 slurm/pretrain_7b.sh
# (CONFIG and a relative OUTPUT_DIR are relative to the checkout.)
# Interactive:  salloc --nodes 2 --gpus-per-node 8 --time 1:00:00, then  bash slurm/pretrain_7b.sh
# One node without SLURM:  torchrun --nproc-per-node 8 -m trainer.train --config configs/7b.yaml
#
#SBATCH --job-name=transfusion-7b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail

is_checkout() { [[ -f "$1/slurm/launch_node.sh" && -f "$1/trainer/train.py" ]]; }
find_checkout() {  # this script's own folder (bash slurm/pretrain_7b.sh), else the submit folder or above
    local dir
    dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)
    is_checkout "$dir" && { echo "$dir"; return 0; }
    dir=${SLURM_SUBMIT_DIR:-$PWD}
    while true; do
        is_checkout "$dir" && { echo "$dir"; return 0; }
        [[ "$dir" == / ]] && return 1
        dir=$(dirname "$dir")
    done
}
if [[ -n "${REPO:-}" ]]; then
    if ! is_checkout "$REPO"; then
        echo "pretrain_7b.sh: REPO=$REPO is not a checkout of this repository (no slurm/launch_node.sh)" >&2
        exit 2
    fi
    REPO=$(cd "$REPO" && pwd)
elif ! REPO=$(find_checkout); then
    echo "pretrain_7b.sh: cannot find the repository: sbatch ran in ${SLURM_SUBMIT_DIR:-$PWD}, outside any" \
        "checkout; run it from the checkout (cd /path/to/checkout && sbatch slurm/pretrain_7b.sh)" \
        "or set REPO=/path/to/checkout" >&2
    exit 2
fi

export CONFIG=${CONFIG:-configs/7b.yaml}
export OUTPUT_DIR=${OUTPUT_DIR:-outputs/7b}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export EXTRA_ARGS=${EXTRA_ARGS:-}
export PYTHON=${PYTHON:-python}
export NNODES=${SLURM_NNODES:-1}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-29500}
export RDZV_ID=${SLURM_JOB_ID:-local}

# NCCL: fail fast on hangs instead of waiting out the collective timeout; InfiniBand where present.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

cd "$REPO" || exit 1
read -r -a extra_args <<< "$EXTRA_ARGS"  # space-separated config overrides
train_args=(--config "$CONFIG" train.output_dir="$OUTPUT_DIR" checkpoint.resume=auto
            ${extra_args[@]+"${extra_args[@]}"})

# One check on this host before any node starts: a config mistake is one line, not one per rank.
"$PYTHON" -m trainer.train --check --world-size "$((NNODES * GPUS_PER_NODE))" "${train_args[@]}" || exit $?

mkdir -p "$OUTPUT_DIR"
rm -f "$OUTPUT_DIR/REQUEUE"
echo "job ${SLURM_JOB_ID:-local}: $NNODES node(s) x $GPUS_PER_NODE, rendezvous $MASTER_ADDR:$MASTER_PORT," \
    "config $CONFIG -> $OUTPUT_DIR"

# SLURM >= 22.05 no longer passes sbatch's --cpus-per-task on to srun: without it each launcher gets one CPU.
srun_args=(--kill-on-bad-exit=1 --ntasks-per-node=1)
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun_pid=
trap '[[ -n "$srun_pid" ]] && kill -USR1 "$srun_pid" 2>/dev/null' USR1  # srun forwards it to the whole step
trap '[[ -n "$srun_pid" ]] && kill -TERM "$srun_pid" 2>/dev/null' TERM
srun "${srun_args[@]}" bash "$REPO/slurm/launch_node.sh" "${train_args[@]}" &
srun_pid=$!
while true; do  # `wait` returns early when a trapped signal arrives: wait again until srun is gone
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

if [[ -f "$OUTPUT_DIR/REQUEUE" ]]; then
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "saved step $(<"$OUTPUT_DIR/REQUEUE") on a preemption signal; not in a SLURM job: run again to resume"
        exit 0
    fi
    echo "saved step $(<"$OUTPUT_DIR/REQUEUE") on a preemption signal; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
