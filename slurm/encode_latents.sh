#!/usr/bin/env bash
# Encode image-caption data into latent MDS shards on a SLURM cluster: an array job with one task
# per partition, then a merge job that runs only if every task succeeded.
#
# Usage (from the repo root, on a login node):
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
# CPUS (default 8), GPUS (default 1 per task; 0 for CPU-only), MAX_PARALLEL (array throttle, %N).
set -euo pipefail

if [[ $# -lt 3 || "$3" != "--" ]]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
NUM_TASKS=$1
OUT=$2
shift 3
PYTHON=${PYTHON:-python}
TIME=${TIME:-24:00:00}
CPUS=${CPUS:-8}
GPUS=${GPUS:-1}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT/logs"

common=(--chdir "$REPO")
[[ -n "${PARTITION:-}" ]] && common+=(--partition "$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && common+=(--account "$ACCOUNT")
gpu=()
[[ "$GPUS" != "0" ]] && gpu=(--gres "gpu:$GPUS")
array="${SBATCH_ARRAY_INX:-0-$((NUM_TASKS - 1))}${MAX_PARALLEL:+%$MAX_PARALLEL}"

# Quote the user's options so they survive being embedded in the batch script.
args=$(printf ' %q' "$@")

# SLURM_ARRAY_TASK_COUNT counts the tasks of *this* submission; with SBATCH_ARRAY_INX set it
# would be wrong, so the world size is passed explicitly and the rank comes from the task id.
array_id=$(sbatch --parsable "${common[@]}" "${gpu[@]}" --job-name encode_latents --array "$array" --time "$TIME" \
  --cpus-per-task "$CPUS" --requeue --output "$OUT/logs/encode_%A_%a.log" <<EOF
#!/usr/bin/env bash
set -euo pipefail
export OMP_NUM_THREADS=\${SLURM_CPUS_PER_TASK:-$CPUS}
exec $PYTHON -m data_prep.encode_latents$args --out $(printf '%q' "$OUT") \\
  --rank "\$SLURM_ARRAY_TASK_ID" --world-size $NUM_TASKS --decode-workers \$((\${SLURM_CPUS_PER_TASK:-$CPUS} - 1))
EOF
)

merge_id=$(sbatch --parsable "${common[@]}" --job-name encode_latents_merge --dependency "afterok:$array_id" \
  --cpus-per-task 1 --time 01:00:00 --output "$OUT/logs/merge_%j.log" <<EOF
#!/usr/bin/env bash
set -euo pipefail
exec $PYTHON -m data_prep.merge_index $(printf '%q' "$OUT")
EOF
)

echo "submitted array job $array_id ($array) and merge job $merge_id; logs in $OUT/logs/"
