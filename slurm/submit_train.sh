#!/bin/bash
# Check, then submit slurm/train_vae.sh on N nodes; print the job id.
#   bash slurm/submit_train.sh N CONFIG.yaml [key=value ...]
#   LSM_SBATCH_ARGS="--partition=gpu --gpus-per-node=8 --cpus-per-task=64" bash slurm/submit_train.sh 4 ...
# Fails at once, queueing nothing, when the config is missing or invalid, the corpus does not
# open or fit the VAE (train_vae.sh --check), or the cluster cannot give N nodes: fewer than N
# nodes of the partition are up (sinfo: down, drained or not responding nodes do not count),
# or sbatch --test-only refuses the request. A job that could never start pends forever otherwise.
set -euo pipefail
usage="usage: submit_train.sh N CONFIG.yaml [key=value ...]"
N=${1:-}
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then echo "submit_train.sh: N (nodes) must be a positive integer; $usage" >&2; exit 2; fi
shift
if [ $# -lt 1 ]; then echo "submit_train.sh: no config given; $usage" >&2; exit 2; fi
here=$(cd "$(dirname "$0")" && pwd)
export LSM_REPO=${LSM_REPO:-$(pwd)}
bash "$here/train_vae.sh" --check "$@" >&2  # config + corpus; prints its own error

# shellcheck disable=SC2206  # LSM_SBATCH_ARGS is a list of arguments
EXTRA=(${LSM_SBATCH_ARGS:-})
PART=
for ((i = 0; i < ${#EXTRA[@]}; i++)); do
  case "${EXTRA[$i]}" in
    -p|--partition) PART=${EXTRA[$((i + 1))]:-} ;;
    --partition=*) PART=${EXTRA[$i]#--partition=} ;;
    -p?*) PART=${EXTRA[$i]#-p} ;;
  esac
done
if [ -z "$PART" ]; then PART=$(sinfo -h -o '%P' | sed -n 's/\*$//p' | head -n 1); fi
# nodes that are up: idle / mixed / allocated / completing (also powered-down cloud nodes, '~');
# not down, drained, failing, or not responding ('*')
STATES=$(sinfo -h -N -p "$PART" -o '%N %t' | sort -u)
if [ -z "$STATES" ]; then
  echo "submit_train.sh: partition '$PART' does not exist or has no nodes (sinfo -N -p '$PART')" >&2
  exit 3
fi
USABLE=$(awk '$2 !~ /\*$/ { s = $2; gsub(/[~#!%$@^-]+$/, "", s); if (s ~ /^(idle|mix|alloc|comp|resv|plnd)$/) n++ } END { print n + 0 }' <<<"$STATES")
if [ "$N" -gt "$USABLE" ]; then
  echo "submit_train.sh: $N node(s) requested, but partition '$PART' has only $USABLE node(s) up" \
       "($(tr '\n' ' ' <<<"$STATES" | sed 's/ $//')); not submitting (it would pend forever)" >&2
  exit 3
fi
if ! msg=$(sbatch --test-only -N "$N" "${EXTRA[@]}" "$here/train_vae.sh" "$@" 2>&1); then
  echo "submit_train.sh: Slurm refuses $N node(s) in partition '$PART': ${msg##*error: }; not submitting" >&2
  exit 3
fi
mkdir -p logs
jid=$(sbatch --parsable -N "$N" "${EXTRA[@]}" "$here/train_vae.sh" "$@")
echo "${jid%%;*}"
