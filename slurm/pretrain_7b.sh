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
# first node, at a port derived from the job id and checked free) with one trainer per GPU.
# Two signals stop a run, with different meanings:
# - USR1, a preemption: ten minutes before the time limit SLURM sends it to every process of the job
#   step (--signal without B:); `scancel --signal=USR1 JOBID` does the same, `--signal=B:USR1@T` or
#   `scancel -b --signal=USR1` send it to this batch shell, which passes it on through srun. The
#   trainers finish their step, save, leave a REQUEUE marker and exit 0, and this script requeues the
#   job, which resumes from the latest checkpoint (checkpoint.resume=auto). A USR1 that arrives while
#   the trainers start (imports, model build, checkpoint load) is kept and acted on after the first step.
# - TERM, a stop: `scancel JOBID`, the time limit itself, and SLURM's own preemption (PreemptMode=
#   REQUEUE or CANCEL, after GraceTime) send it. The trainers finish their step and save if they can
#   within KillWait (SLURM then sends KILL), and the job is never requeued by this script: it ends
#   CANCELLED (or TIMEOUT); under PreemptMode=REQUEUE SLURM requeues it by itself.
# Before any node starts, the config is validated once here: a mistake ends the job with one
# `config error: ...` line; so does a time limit not well above the USR1 lead (it would requeue forever).
#
# Override with environment variables, e.g.
#   CONFIG=configs/1.4b.yaml OUTPUT_DIR=/checkpoints/run1 EXTRA_ARGS="optim.lr=2e-4" sbatch --nodes 8 slurm/pretrain_7b.sh
# (CONFIG and a relative OUTPUT_DIR are relative to the checkout.)
# Interactive:  salloc --nodes 2 --gpus-per-node 8 --time 1:00:00, then  bash slurm/pretrain_7b.sh
#   (a preemption then saves, and you run it again to resume: there is no batch job to requeue)
# Nodes without GPUs (CPU tests, the tiny config): GPUS_PER_NODE is the number of trainers per node,
#   GPUS_PER_NODE=2 CONFIG=configs/tiny.yaml EXTRA_ARGS="parallel.dp_shard=-1 train.device=cpu" \
#     sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/pretrain_7b.sh
# OMP_NUM_THREADS defaults to the task's CPUs divided among the trainers (at least 1).
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
export RDZV_ID=${SLURM_JOB_ID:-local}
batch_job=; [[ "${ENVIRONMENT:-}" == BATCH && -n "${SLURM_JOB_ID:-}" ]] && batch_job=$SLURM_JOB_ID

# NCCL: fail fast on hangs instead of waiting out the collective timeout; InfiniBand where present.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / GPUS_PER_NODE > 0 ? cpus / GPUS_PER_NODE : 1 ))}

cd "$REPO" || exit 1
read -r -a extra_args <<< "$EXTRA_ARGS"  # space-separated config overrides
train_args=(--config "$CONFIG" train.output_dir="$OUTPUT_DIR" checkpoint.resume=auto
            ${extra_args[@]+"${extra_args[@]}"})

# Checks on this host before any node starts: a mistake is one line, not one per rank.
# shellcheck source=slurm/job_checks.sh
source "$REPO/slurm/job_checks.sh"
[[ -n "$batch_job" ]] && { check_time_limit "$batch_job" "$0" || exit 2; }
"$PYTHON" -m trainer.train --check --world-size "$((NNODES * GPUS_PER_NODE))" "${train_args[@]}" || exit $?
if [[ -z "${MASTER_PORT:-}" ]]; then  # this host is the first node: the rendezvous listens here
    MASTER_PORT=$(free_port "${SLURM_JOB_ID:-$$}") || exit 1
fi
export MASTER_PORT

mkdir -p "$OUTPUT_DIR"
rm -f "$OUTPUT_DIR/REQUEUE"
echo "job ${SLURM_JOB_ID:-local}: $NNODES node(s) x $GPUS_PER_NODE trainer(s), $OMP_NUM_THREADS OMP thread(s) each," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG -> $OUTPUT_DIR"

# SLURM >= 22.05 no longer passes sbatch's --cpus-per-task on to srun: without it each launcher gets one CPU.
srun_args=(--kill-on-bad-exit=1 --ntasks-per-node=1)
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun_pid='' stopped=''
trap '[[ -n "$srun_pid" ]] && kill -USR1 "$srun_pid" 2>/dev/null' USR1  # srun forwards it to the whole step
trap 'stopped=1; [[ -n "$srun_pid" ]] && kill -TERM "$srun_pid" 2>/dev/null' TERM
srun "${srun_args[@]}" bash "$REPO/slurm/launch_node.sh" "${train_args[@]}" &
srun_pid=$!
while true; do  # `wait` returns early when a trapped signal arrives: wait again until srun is gone
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

if [[ -f "$OUTPUT_DIR/REQUEUE" ]]; then
    saved="saved step $(<"$OUTPUT_DIR/REQUEUE") on a preemption signal"
    if [[ -n "$stopped" ]]; then  # a cancel after the preemption signal: cancel wins
        echo "$saved, then stopped by TERM (scancel or the time limit): not requeueing"
    elif [[ -z "$batch_job" ]]; then
        echo "$saved; not a batch job (salloc, or no SLURM): nothing to requeue, run again to resume"
    else
        echo "$saved; requeueing job $batch_job"
        scontrol requeue "$batch_job"
    fi
    exit 0
fi
exit "$rc"
