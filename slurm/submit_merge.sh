#!/bin/bash
# Submit a merge plan as a chain of Slurm jobs (see slurm/merge.sh); print the job ids.
#   bash slurm/submit_merge.sh N PLAN.yaml [key=value ...]
# N array tasks encode and N merge (more tasks than layer files leaves some idle). Each stage
# starts only if the previous one succeeded (afterok; a failed stage cancels the rest).
# Extra sbatch arguments for every job: LSM_SBATCH_ARGS="--partition=x --time=60".
set -euo pipefail
usage="usage: submit_merge.sh N PLAN.yaml [key=value ...]"
N=${1:-}
if ! [[ "$N" =~ ^[1-9][0-9]{0,5}$ ]]; then
  echo "submit_merge.sh: N must be an integer from 1 to 999999 (got '${N}'); $usage" >&2; exit 2
fi
shift
PLAN=${1:-}
if [ -z "$PLAN" ] || [ ! -f "$PLAN" ]; then
  echo "submit_merge.sh: merge plan '${PLAN}' does not exist; $usage" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
REPO=${LSM_REPO:-$(pwd)}
PY=${LSM_PYTHON:-$REPO/.venv/bin/python}
# validate the plan before anything is queued (the models are opened by the first stage)
SPACE=$("$PY" - "$@" <<'PYEOF'
import sys

from lsm_dist.config import ConfigError
from lsm_dist.merge.plan import load_plan

try:
    plan = load_plan(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"submit_merge.sh: invalid merge plan {sys.argv[1]}: {e}")
print(plan.space)
PYEOF
)
mkdir -p logs
# sb: submit one job and set JID. Not run in $(...): errexit does not reach into a command
# substitution, and a failed sbatch must stop the chain (printing empty ids, exit 0, it did not),
# cancelling the jobs already queued so that no stage runs without the ones after it.
submitted=()
# shellcheck disable=SC2086  # LSM_SBATCH_ARGS is a list of arguments
sb() {
  local out
  if ! out=$(sbatch --parsable ${LSM_SBATCH_ARGS:-} "$@"); then
    [ ${#submitted[@]} -eq 0 ] || scancel "${submitted[@]}" || true
    echo "submit_merge.sh: sbatch failed (see its message above); nothing left queued" \
         "${submitted[*]:+(cancelled ${submitted[*]})}" >&2
    exit 1
  fi
  JID=${out%%;*}
  submitted+=("$JID")
}
after=()
enc=- fin=-
if [ "$SPACE" = latent ]; then
  sb --array=0-$((N - 1)) "$here/merge.sh" encode "$@"; enc=$JID
  sb --dependency=afterok:"$enc" --kill-on-invalid-dep=yes "$here/merge.sh" encode-finalize "$@"; fin=$JID
  after=(--dependency=afterok:"$fin" --kill-on-invalid-dep=yes)
fi
sb --array=0-$((N - 1)) "${after[@]}" "$here/merge.sh" merge "$@"; mrg=$JID
sb --dependency=afterok:"$mrg" --kill-on-invalid-dep=yes "$here/merge.sh" assemble "$@"; asm=$JID
echo "encode $enc finalize $fin merge $mrg assemble $asm"
