# Checks slurm/pretrain_7b.sh runs in its batch job before any node starts (sourced, not run).
# shellcheck shell=bash

# seconds in a SLURM time (squeue %l: M:SS, H:MM:SS, D-HH:MM:SS); nothing for UNLIMITED
time_seconds() {
    local days=0 rest=$1 h=0 m=0 s=0
    [[ "$rest" =~ ^[0-9:-]+$ ]] || return 1
    [[ "$rest" == *-* ]] && { days=${rest%%-*}; rest=${rest#*-}; }
    IFS=: read -r -a parts <<< "$rest"
    case ${#parts[@]} in
        1) m=${parts[0]} ;;
        2) m=${parts[0]}; s=${parts[1]} ;;
        3) h=${parts[0]}; m=${parts[1]}; s=${parts[2]} ;;
        *) return 1 ;;
    esac
    echo $(( ((10#$days * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}

# The lead of the USR1 the job asked for: SBATCH_SIGNAL (sbatch's own variable), else the script's
# `#SBATCH --signal=` line. A --signal on sbatch's command line is not visible inside the job.
signal_lead() {
    local spec=${SBATCH_SIGNAL:-$(sed -n 's/^#SBATCH[[:space:]]\{1,\}--signal=//p' "$1" | head -n 1)}
    [[ "$spec" =~ ^(R:)?(B:)?(SIG)?USR1@([0-9]+)$ ]] && echo "${BASH_REMATCH[4]}"
}

# Refuse a time limit not well above (2x) the USR1 lead: SLURM would signal every run after a few
# minutes, each would save and requeue, forever.
check_time_limit() {  # JOB_ID SCRIPT
    local limit lead seconds
    limit=$(squeue -h -j "$1" -o %l 2>/dev/null) || return 0
    lead=$(signal_lead "$2") || return 0
    seconds=$(time_seconds "$limit") || return 0
    if (( seconds < 2 * lead )); then
        echo "pretrain_7b.sh: the time limit $limit is not well above the USR1 sent ${lead} s before it" \
            "(--signal=USR1@$lead): every run would save and requeue after $(( (seconds - lead) / 60 > 0 ? (seconds - lead) / 60 : 0 ))" \
            "min, forever; give --time of at least $(( 2 * lead / 60 )) min, or a shorter lead" \
            "(SBATCH_SIGNAL=USR1@S)" >&2
        return 1
    fi
}

# A port for the rendezvous: 15000-29999 (below Linux's ephemeral range) from the job id, or the
# first free one after it on this host, so that two jobs sharing a node never meet in one TCPStore.
free_port() {  # SEED
    local first=$(( 15000 + $1 % 15000 )) i port
    for ((i = 0; i < 200; i++)); do
        port=$(( 15000 + (first - 15000 + i) % 15000 ))
        "$PYTHON" -c 'import socket, sys; socket.socket().bind(("", int(sys.argv[1])))' "$port" 2>/dev/null \
            && { echo "$port"; return 0; }
    done
    echo "pretrain_7b.sh: no free port for the rendezvous in $first-$(( first + 199 )) on $(hostname); set MASTER_PORT" >&2
    return 1
}
