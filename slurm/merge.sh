#!/bin/bash
# One stage of a merge plan as a Slurm job; slurm/submit_merge.sh chains them:
#   encode array (each task: its share of (model, tensor) pairs into the latent cache)
#   -> encode-finalize (checks every tensor is encoded, writes the latent manifests)
#   -> merge array (each task: its share of the layer files, merged and decoded)
#   -> assemble (the HF checkpoint out_dir/model + MERGE_COMPLETE.json, checked).
# Weight-space plans (space: weight) skip the two encode stages. By hand:
#   jid=$(sbatch --parsable --array=0-3 slurm/merge.sh merge configs/merge/weight_lerp.yaml)
#   sbatch --dependency=afterok:$jid slurm/merge.sh assemble configs/merge/weight_lerp.yaml
# Array tasks split the work by SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT
# (lsm_dist.dist.read_env().worker_slot()); finished files are skipped when re-run.
# On GPU nodes add --gpus=1 (device: auto uses it).
#SBATCH --job-name=lsm-merge
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
usage="usage: merge.sh encode|encode-finalize|merge|assemble PLAN.yaml [key=value ...]"
STAGE=${1:-}
case "$STAGE" in
  encode) ARGS=(encode --worker) ;;
  encode-finalize) ARGS=(encode --finalize) ;;
  merge) ARGS=(merge --worker) ;;
  assemble) ARGS=(assemble) ;;
  *) echo "merge.sh: unknown stage '$STAGE'; $usage" >&2; exit 2 ;;
esac
PLAN=${2:-}
if [ -z "$PLAN" ]; then echo "merge.sh: no merge plan given; $usage" >&2; exit 2; fi
shift 2
REPO=${LSM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PY=${LSM_PYTHON:-$REPO/.venv/bin/python}
cd "$REPO"
if [ ! -f "$PLAN" ]; then echo "merge.sh: merge plan '$PLAN' does not exist (relative to $REPO)" >&2; exit 2; fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
echo "merge.sh: $STAGE on $(hostname -s) (job ${SLURM_JOB_ID:-none}, array task ${SLURM_ARRAY_TASK_ID:--}/${SLURM_ARRAY_TASK_COUNT:--})"
# start and end stamps: how long each array task took (benchmarks/bench_scale.py reads them)
echo "lsm-time $(date +%s.%N) start"
rc=0
"$PY" -m lsm_dist.cli "${ARGS[@]}" --config "$PLAN" "$@" || rc=$?
echo "lsm-time $(date +%s.%N) end (exit $rc)"
exit $rc
