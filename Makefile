# `make demo` and `make test` set everything up on a fresh machine (tools/setup.sh) first.
VENV ?= .venv
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test lint slurm

setup:
	bash tools/setup.sh

demo: setup
	$(VENV)/bin/lsm demo $(ARGS)

test: setup
	bash tools/slurm-local.sh start || echo "local Slurm not started: slurm-marked tests will skip"
	$(VENV)/bin/python -m pytest $(ARGS)

lint: setup
	$(VENV)/bin/ruff check lsm_dist launchers tools tests benchmarks

slurm:
	bash tools/slurm-local.sh start
