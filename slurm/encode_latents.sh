#!/usr/bin/env bash
# Encode image-caption data into latent MDS shards on a SLURM cluster: an array job with one task
# per partition, then a merge job that runs only if every task succeeded.
#
# Usage (on a login node; relative paths are relative to the folder you run it in):
#   slurm/encode_latents.sh NUM_TASKS OUT -- [encode_latents options except --out/--rank/--world-size]
# Example:
#   slurm/encode_latents.sh 64 /shards/laion_256 -- --input '/data/laion/*.tar' \
#       --vae /models/vae --tokenizer /models/tok/tokenizer.model --resolution 256
#
# Each task runs `python -m data_prep.encode_latents ... --out OUT`; its rank and the world size
# come from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, so task i writes OUT/part-0000i. The merge
# job runs `python -m data_prep.merge_index OUT` (OUT/index.json, OUT/report.json).
# Resuming: rerun the same command; finished chunks are skipped, partial ones redone. Tasks are
# requeued on preemption/node failure (--requeue). To redo only some tasks:
#   SBATCH_ARRAY_INX=3,17 slurm/encode_latents.sh 64 /shards/laion_256 -- ...   (same NUM_TASKS!)
# Environment knobs: PYTHON (default: python), PARTITION, ACCOUNT, TIME (default 24:00:00),
# CPUS (default 8), GPUS (default 1 per task; 0 for CPU-only), MAX_PARALLEL (array throttle, %N),
# REPO (the checkout; default: the one holding this script, else the current folder or above).
# The jobs run in the current folder with the checkout on PYTHONPATH; each is a batch script
# without srun, so it has all CPUS of its allocation. Logs: OUT/logs/ (made before submitting).
set -euo pipefail

if [[ $# -lt 3 || "$3" != "--" ]]; then
  sed -n '2,21p' "$0" >&2
  exit 2
fi
is_checkout() { [[ -f "$1/data_prep/encode_latents.py" && -d "$1/slurm" ]]; }
find_checkout() {  # this script's own folder, else (a copy run by sbatch from slurmd's spool) $PWD or above
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
  is_checkout "$REPO" || { echo "encode_latents.sh: REPO=$REPO is not a checkout of this repository" >&2; exit 2; }
  REPO=$(cd "$REPO" && pwd)
elif ! REPO=$(find_checkout); then
  echo "encode_latents.sh: cannot find the repository checkout from ${SLURM_SUBMIT_DIR:-$PWD};" \
    "run it from the checkout or set REPO=/path/to/checkout" >&2
  exit 2
fi
NUM_TASKS=$1
OUT=$2
shift 3
PYTHON=${PYTHON:-python}
TIME=${TIME:-24:00:00}
CPUS=${CPUS:-8}
GPUS=${GPUS:-1}
mkdir -p "$OUT/logs"  # SLURM fails a job whose --output folder does not exist, without any log
OUT=$(cd "$OUT" && pwd)

common=(--chdir "$PWD")
[[ -n "${PARTITION:-}" ]] && common+=(--partition "$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && common+=(--account "$ACCOUNT")
gpu=()
[[ "$GPUS" != "0" ]] && gpu=(--gres "gpu:$GPUS")
array="${SBATCH_ARRAY_INX:-0-$((NUM_TASKS - 1))}${MAX_PARALLEL:+%$MAX_PARALLEL}"

# Quote the user's options (and paths) so they survive being embedded in the batch scripts.
args=$(printf ' %q' "$@")
python=$(printf '%q' "$PYTHON")
pythonpath=$(printf '%q' "$REPO${PYTHONPATH:+:$PYTHONPATH}")

# SLURM_ARRAY_TASK_COUNT counts the tasks of *this* submission; with SBATCH_ARRAY_INX set it
# would be wrong, so the world size is passed explicitly and the rank comes from the task id.
array_id=$(sbatch --parsable "${common[@]}" ${gpu[@]+"${gpu[@]}"} --job-name encode_latents --array "$array" --time "$TIME" \
  --cpus-per-task "$CPUS" --requeue --output "$OUT/logs/encode_%A_%a.log" <<EOF
#!/usr/bin/env bash
set -euo pipefail
export OMP_NUM_THREADS=\${SLURM_CPUS_PER_TASK:-$CPUS} PYTHONPATH=$pythonpath
exec $python -m data_prep.encode_latents$args --out $(printf '%q' "$OUT") \\
  --rank "\$SLURM_ARRAY_TASK_ID" --world-size $NUM_TASKS --decode-workers \$((\${SLURM_CPUS_PER_TASK:-$CPUS} - 1))
EOF
)

merge_id=$(sbatch --parsable "${common[@]}" --job-name encode_latents_merge --dependency "afterok:$array_id" \
  --cpus-per-task 1 --time 01:00:00 --output "$OUT/logs/merge_%j.log" <<EOF
#!/usr/bin/env bash
set -euo pipefail
export PYTHONPATH=$pythonpath
exec $python -m data_prep.merge_index $(printf '%q' "$OUT")
EOF
)

echo "submitted array job $array_id ($array) and merge job $merge_id; logs in $OUT/logs/"
