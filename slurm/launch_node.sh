#!/usr/bin/env bash
# One node's share of slurm/pretrain_7b.sh: torchrun with c10d rendezvous, and signal forwarding.
#
# torchrun's agent does not forward SIGUSR1 to its workers, so this wrapper does: on USR1 or TERM
# it signals the trainer processes (torchrun's children) with USR1, and they save and exit.
set -uo pipefail

read -r -a extra_args <<< "${EXTRA_ARGS:-}"  # space-separated config overrides
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
    -m trainer.train --config "$CONFIG" train.output_dir="$OUTPUT_DIR" checkpoint.resume=auto "${extra_args[@]}" &
torchrun_pid=$!

# shellcheck disable=SC2329  # invoked by the trap below
forward() {
    echo "$(hostname): forwarding a preemption signal to the trainers"
    pkill -USR1 -P "$torchrun_pid" || true
}
trap forward USR1 TERM

# `wait` returns early when a trapped signal arrives: keep waiting until torchrun is gone.
while true; do
    wait "$torchrun_pid"
    rc=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break
done
exit "$rc"
