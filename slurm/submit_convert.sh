#!/bin/bash
# Submit an N-task conversion array and its manifest step (afterok), print both job ids.
#   bash slurm/submit_convert.sh N CONFIG.yaml [key=value ...] [-- extra sbatch args]
set -euo pipefail
usage="usage: submit_convert.sh N CONFIG.yaml [key=value ...]"
N=${1:-}
# only digits reach the arithmetic below: bash evaluates $((N - 1)) as an expression, where
# a crafted N ("a[$(cmd)]") would run a command; 0 would submit --array=0--1
if ! [[ "$N" =~ ^[1-9][0-9]{0,5}$ ]]; then
  echo "submit_convert.sh: N (array tasks) must be a positive integer (1-999999), got '${N}'; $usage" >&2
  exit 2
fi
shift
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "submit_convert.sh: config '${1:-}' does not exist; $usage" >&2
  exit 2
fi
mkdir -p logs
here=$(cd "$(dirname "$0")" && pwd)
arr=$(sbatch --parsable ${LSM_SBATCH_ARGS:-} --array=0-$((N - 1)) "$here/convert.sh" "$@")
fin=$(sbatch --parsable ${LSM_SBATCH_ARGS:-} --dependency=afterok:${arr%%;*} --kill-on-invalid-dep=yes "$here/convert.sh" --finalize "$@")
echo "array ${arr%%;*} finalize ${fin%%;*}"
