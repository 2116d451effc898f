#!/bin/bash
# Weight-corpus conversion as a Slurm array: one task per share of the shards, then a final
# manifest step. Submit both with slurm/submit_convert.sh, or by hand:
#   jid=$(sbatch --parsable --array=0-7 slurm/convert.sh configs/convert/zoo.yaml out_dir=/scratch/corpus)
#   sbatch --dependency=afterok:$jid slurm/convert.sh --finalize configs/convert/zoo.yaml out_dir=/scratch/corpus
# An array task writes only its own shards (lsm_dist.dist reads SLURM_ARRAY_TASK_ID/COUNT);
# a re-submitted array skips finished shards.
#SBATCH --job-name=lsm-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
MODE=--worker
if [ "${1:-}" = "--finalize" ]; then MODE=--finalize; shift; fi
CONFIG=${1:?usage: convert.sh [--finalize] CONFIG.yaml [key=value ...]}
shift
REPO=${LSM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PY=${LSM_PYTHON:-$REPO/.venv/bin/python}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
cd "$REPO"
if [ "$MODE" = --worker ] && [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "convert.sh: submit with --array=0-(N-1) (or pass --finalize)" >&2
  exit 2
fi
exec "$PY" -m lsm_dist.cli convert "$MODE" --config "$CONFIG" "$@"
