#!/usr/bin/env bash
# The GPU figures in one short run (benchmarks/gpu_suite.py has what is measured and the targets).
#   bash benchmarks/gpu_suite.sh            # on a CUDA host: every figure, into $OUT (or ./gpu_suite_out)
#   bash benchmarks/gpu_suite.sh --smoke    # tiny sizes on any device: the code path (CI runs this)
# Extra arguments pass through (--out DIR, --skip ties profile, --steps N, --workdir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LSM_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export DS_ACCELERATOR=${DS_ACCELERATOR:-$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_suite.py "$@"
