#!/usr/bin/env bash
# One node's share of slurm/pretrain_7b.sh:  launch_node.sh TRAINER_ARGS...
# runs torchrun (c10d rendezvous at MASTER_ADDR:MASTER_PORT, NNODES nodes x GPUS_PER_NODE trainers)
# through slurm/elastic_run.py, which ends a failed run with one line instead of torchrun's traceback.
#
# Stop signals (USR1: save and requeue; TERM: save and stop; see slurm/pretrain_7b.sh), in both ways
# SLURM delivers them:
# - to every process of the step at once (--signal=USR1@T, scancel): torchrun's agent would die of
#   USR1 (exit 138: no checkpoint, no requeue), so it starts with USR1 ignored. The agent installs
#   handlers only for TERM/INT/HUP/QUIT and starts the trainers with the SIG_IGN inherited; each
#   trainer installs its own USR1/TERM handler first thing, which replaces it.
# - to this launcher only: it passes the signal on to the trainers (torchrun's children).
# Either way this launcher also writes the signal to $TRANSFUSION_SIGNAL_FILE, which the trainers read
# when their loop starts: a signal sent before they existed, or while they still ignored it, is kept.
set -uo pipefail

export TRANSFUSION_SIGNAL_FILE="${TMPDIR:-/tmp}/transfusion-signals.${SLURM_JOB_ID:-local}.$$"
rm -f "$TRANSFUSION_SIGNAL_FILE"
torchrun_pid=''
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
    echo "$1" >> "$TRANSFUSION_SIGNAL_FILE"
    echo "$HOSTNAME: forwarding $1 to the trainers"
    [[ -n "$torchrun_pid" ]] && { pkill "-$1" -P "$torchrun_pid" || true; }
}
trap 'forward TERM' TERM
trap '' USR1  # inherited by torchrun's agent and, until they install their handler, by the trainers
"$PYTHON" "$(dirname "${BASH_SOURCE[0]}")/elastic_run.py" \
    --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
    -m trainer.train "$@" &
torchrun_pid=$!
trap 'forward USR1' USR1

while true; do  # `wait` returns early when a trapped signal arrives: wait again until torchrun is gone
    wait "$torchrun_pid"
    rc=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break
done
rm -f "$TRANSFUSION_SIGNAL_FILE"
exit "$rc"
