#!/usr/bin/env bash
# Pretrain Transfusion 7B on a SLURM GPU cluster:   sbatch slurm/pretrain_7b.sh
#
# One task per node; each runs slurm/launch_node.sh, which starts torchrun (c10d rendezvous on the
# first node) with one process per GPU. SLURM signals USR1 ten minutes before the time limit; the
# trainers finish their step, save a checkpoint and leave a REQUEUE marker, and this script
# requeues the job, which resumes from the latest checkpoint (checkpoint.resume=auto).
#
# Override with environment variables, e.g.
#   CONFIG=configs/1.4b.yaml OUTPUT_DIR=/checkpoints/run1 EXTRA_ARGS="optim.lr=2e-4" sbatch --nodes 8 slurm/pretrain_7b.sh
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
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err

set -uo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
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
mkdir -p logs "$OUTPUT_DIR"
rm -f "$OUTPUT_DIR/REQUEUE"
echo "job ${SLURM_JOB_ID:-local}: $NNODES node(s) x $GPUS_PER_NODE, rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG -> $OUTPUT_DIR"

srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash "$REPO/slurm/launch_node.sh"
rc=$?

if [[ -f "$OUTPUT_DIR/REQUEUE" ]]; then
    echo "saved on a preemption signal; requeueing job ${SLURM_JOB_ID:-local}"
    scontrol requeue "${SLURM_JOB_ID:-0}"
    exit 0
fi
exit "$rc"
