#!/bin/bash
# Submit an N-task conversion array and its manifest step (afterok), print both job ids.
#   bash slurm/submit_convert.sh N CONFIG.yaml [key=value ...] [-- extra sbatch args]
set -euo pipefail
N=${1:?usage: submit_convert.sh N CONFIG.yaml [key=value ...]}
shift
mkdir -p logs
here=$(cd "$(dirname "$0")" && pwd)
arr=$(sbatch --parsable ${LSM_SBATCH_ARGS:-} --array=0-$((N - 1)) "$here/convert.sh" "$@")
fin=$(sbatch --parsable ${LSM_SBATCH_ARGS:-} --dependency=afterok:${arr%%;*} --kill-on-invalid-dep=yes "$here/convert.sh" --finalize "$@")
echo "array ${arr%%;*} finalize ${fin%%;*}"
