#!/usr/bin/env bash
# One node's share of slurm/pretrain_7b.sh:  launch_node.sh TRAINER_ARGS...
# runs torchrun (c10d rendezvous at MASTER_ADDR:MASTER_PORT, NNODES nodes x GPUS_PER_NODE trainers)
# through slurm/elastic_run.py, which ends a failed run with one line instead of torchrun's traceback.
#
# Preemption signals, in both ways SLURM delivers them:
# - to every process of the step at once (--signal=USR1@T, scancel --signal=USR1): torchrun's agent
#   would die of USR1 (exit 138: no checkpoint, no requeue), so it starts with USR1 ignored. The
#   agent installs handlers only for TERM/INT/HUP/QUIT and starts the trainers with the SIG_IGN
#   inherited; each trainer then installs its own USR1/TERM handler, which replaces it.
# - to this launcher only: it passes USR1 on to the trainers (torchrun's children).
# Either way the trainers finish their step, save, write REQUEUE and exit 0 (a repeated USR1 is harmless).
set -uo pipefail

trap '' USR1  # inherited by torchrun's agent and, until they install their handler, by the trainers
"$PYTHON" "$(dirname "${BASH_SOURCE[0]}")/elastic_run.py" \
    --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
    -m trainer.train "$@" &
torchrun_pid=$!

# shellcheck disable=SC2329  # invoked by the trap below
forward() {
    echo "$HOSTNAME: forwarding a preemption signal to the trainers"
    pkill -USR1 -P "$torchrun_pid" || true
}
trap forward USR1 TERM

while true; do  # `wait` returns early when a trapped signal arrives: wait again until torchrun is gone
    wait "$torchrun_pid"
    rc=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break
done
exit "$rc"
