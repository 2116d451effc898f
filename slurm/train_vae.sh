#!/bin/bash
# VAE training on N nodes x P ranks per node (GPUs, or CPU processes), preemptible and requeued.
#
#   sbatch -N 2 slurm/train_vae.sh configs/train/tiny.yaml corpus=runs/corpus-tiny run_dir=runs/train-tiny
#   sbatch -N 4 --gpus-per-node=8 --cpus-per-task=64 slurm/train_vae.sh configs/train/paper.yaml ...
#   bash slurm/submit_train.sh N CONFIG.yaml [key=value ...]   (checks config, corpus and capacity first)
#   bash slurm/train_vae.sh --check CONFIG.yaml [key=value ...] (only the checks, no Slurm needed)
#
# One launcher per node (srun --ntasks-per-node=1): `accelerate launch --num_machines N
# --machine_rank $SLURM_NODEID --main_process_ip <first node> --deepspeed_multinode_launcher
# standard -m lsm_dist.train`, or `torchrun --nnodes N --node_rank ...` with LSM_LAUNCHER=torchrun;
# each starts P ranks (P = GPUs on the node, else LSM_PROCS_PER_NODE, default 1). Rendezvous:
# static, on the first host of SLURM_JOB_NODELIST, port 20000 + job id % 10000 (LSM_MASTER_PORT).
#
# Preemption: --signal=USR2@120 makes Slurm send SIGUSR2 to every process of the job steps
# 120 s before the time limit (also `scancel --signal=USR2 JOBID`). The launchers start with
# SIGUSR2 ignored (it would kill them: neither accelerate nor torchrun handles it), so only the
# Python ranks act on it: they agree on the step, write a checkpoint, rank 0 writes
# RUN_DIR/PREEMPTED, and all exit 0. This script then runs `scontrol requeue`; the requeued job
# resumes from the newest complete checkpoint (resume=auto). SIGUSR2 sent to the batch shell
# (`--signal=B:USR2@120`, `scancel --batch --signal=USR2`) is forwarded to the job steps.
#
# Outputs in RUN_DIR: config.yaml (resolved, by the trainer), logs/rank<r>.log (each rank),
# logs/node<n>-<job>.log (each launcher), logs/slurm-<job>.log (this script), checkpoints/,
# tb/, metrics.jsonl, vae/ (exported at the end).
#
# Environment: LSM_REPO (repository, default the submit dir), LSM_PYTHON (default
# .venv/bin/python), LSM_LAUNCHER (accelerate | torchrun), LSM_ACCELERATE_CONFIG,
# LSM_PROCS_PER_NODE, LSM_MASTER_PORT, LSM_MAX_REQUEUES (default 50).
#SBATCH --job-name=lsm-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
usage="usage: sbatch -N NODES slurm/train_vae.sh CONFIG.yaml [key=value ...]"
CHECK_ONLY=0
if [ "${1:-}" = "--check" ]; then CHECK_ONLY=1; shift; fi
CONFIG=${1:-}
if [ -z "$CONFIG" ] || [ "${CONFIG#*=}" != "$CONFIG" ]; then
  echo "train_vae.sh: the first argument must be the training config YAML; $usage" >&2
  exit 2
fi
shift
REPO=${LSM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
if [ ! -f "$CONFIG" ]; then
  echo "train_vae.sh: config file '$CONFIG' does not exist (relative to $REPO)" >&2
  exit 2
fi
PY=${LSM_PYTHON:-$REPO/.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "train_vae.sh: no Python at $PY (set LSM_PYTHON, or run tools/setup.sh)" >&2
  exit 2
fi

# Fail before any srun: the config must validate and the corpora must open and fit the VAE.
PRE=$("$PY" - "$CONFIG" "$@" <<'EOF'
import sys
from pathlib import Path

from lsm_dist.config import ConfigError
from lsm_dist.corpus.convert import CorpusError
from lsm_dist.train.config import load_train_config
from lsm_dist.train.setup import open_corpus

try:
    cfg = load_train_config(sys.argv[1], sys.argv[2:])
    open_corpus(cfg.corpus, "corpus", cfg.model)
    if cfg.heldout_corpus:
        open_corpus(cfg.heldout_corpus, "heldout_corpus", cfg.model)
except (ConfigError, CorpusError, FileNotFoundError) as e:
    sys.exit(f"train_vae.sh: invalid config {sys.argv[1]}: {e}")
print(Path(cfg.run_dir).resolve())
print(cfg.resume)
EOF
) || exit 2
RUN_DIR=$(sed -n 1p <<<"$PRE")
RESUME=$(sed -n 2p <<<"$PRE")
if [ "$CHECK_ONLY" = 1 ]; then
  echo "train_vae.sh: ok: run_dir=$RUN_DIR resume=$RESUME"
  exit 0
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "train_vae.sh: not inside a Slurm job; $usage" >&2
  exit 2
fi

mkdir -p "$RUN_DIR/logs"
LOG=$RUN_DIR/logs/slurm-$SLURM_JOB_ID.log
log() { echo "[$(date '+%F %T')] train_vae.sh: $*" | tee -a "$LOG"; }

NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${LSM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
GPUS=${SLURM_GPUS_ON_NODE:-0}
if [ "$GPUS" = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$GPUS" -gt 0 ]; then
  PPN=${LSM_PROCS_PER_NODE:-$GPUS}
  ACC_CFG=${LSM_ACCELERATE_CONFIG:-configs/accelerate/zero2_gpu.yaml}
  threads=$(( ${SLURM_CPUS_PER_TASK:-$PPN} / PPN ))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
else
  PPN=${LSM_PROCS_PER_NODE:-1}
  ACC_CFG=${LSM_ACCELERATE_CONFIG:-configs/accelerate/zero2_cpu_2proc.yaml}
  export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu  # the trainer picks gloo without CUDA
fi
export PYTHONUNBUFFERED=1

LAUNCHER=${LSM_LAUNCHER:-accelerate}
case "$LAUNCHER" in
  accelerate)
    [ -f "$ACC_CFG" ] || { log "accelerate config '$ACC_CFG' does not exist (LSM_ACCELERATE_CONFIG)"; exit 2; }
    LAUNCH=("$PY" -m accelerate.commands.launch --config_file "$ACC_CFG"
            --num_machines "$NNODES" --machine_rank @NODE_RANK@ --num_processes $((NNODES * PPN))
            --main_process_ip "$HEAD" --main_process_port "$PORT"
            --deepspeed_multinode_launcher standard --rdzv_backend static --same_network) ;;
  torchrun)
    LAUNCH=("$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank @NODE_RANK@
            --nproc_per_node "$PPN" --master_addr "$HEAD" --master_port "$PORT") ;;
  *) log "LSM_LAUNCHER=$LAUNCHER is not one of: accelerate torchrun"; exit 2 ;;
esac
CMD=("${LAUNCH[@]}" -m lsm_dist.train --config "$CONFIG" "$@")

[ "$RESUME" = auto ] || log "warning: resume=$RESUME: a requeued job will not continue from its checkpoint"
# the flag of an earlier run of ours only (a run_dir lsm train made: its lsm_run.json)
if [ -f "$RUN_DIR/lsm_run.json" ]; then rm -f "$RUN_DIR/PREEMPTED"; fi
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $NNODES node(s) x $PPN rank(s)," \
    "rendezvous $HEAD:$PORT, run_dir $RUN_DIR"
log "per node: ${CMD[*]}"

# Inside the step: ignore SIGUSR2 in the launcher (the ranks install their own handler), and put
# this node's index into the launcher's node-rank flag.
STEP='trap "" USR2; a=(); for x in "$@"; do a+=("${x//@NODE_RANK@/$SLURM_NODEID}"); done; exec "${a[@]}"'
SRUN=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --open-mode=append
      --output="${RUN_DIR//%/%%}/logs/node%n-%j.log")  # a % of the path is literal, not a pattern
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
trap 'log "SIGUSR2 on the batch shell: forwarding to the job steps"; scancel --signal=USR2 "$SLURM_JOB_ID"' USR2
"${SRUN[@]}" bash -c "$STEP" lsm-train-step "${CMD[@]}" &
STEP_PID=$!
rc=0
while :; do
  wait "$STEP_PID" && rc=0 || rc=$?
  kill -0 "$STEP_PID" 2>/dev/null || break  # wait was interrupted by a trapped signal
done
trap - USR2

if [ -f "$RUN_DIR/PREEMPTED" ]; then
  restarts=${SLURM_RESTART_COUNT:-0}
  if [ "$restarts" -ge "${LSM_MAX_REQUEUES:-50}" ]; then
    log "preempted ($(tr -d "\n " < "$RUN_DIR/PREEMPTED")), but already requeued $restarts times" \
        "(LSM_MAX_REQUEUES): not requeueing; sbatch again to resume"
    exit 3
  fi
  log "preempted: $(tr -d "\n " < "$RUN_DIR/PREEMPTED"); requeueing job $SLURM_JOB_ID (resumes from the checkpoint)"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    log "scontrol requeue failed: submit the same command again to resume"
    exit 4
  fi
  exit 0
fi
if [ "$rc" -ne 0 ]; then
  log "FAILED: training step exited with status $rc (a node or rank died, or an error:" \
      "see $RUN_DIR/logs/). Submitting again resumes from the newest complete checkpoint."
  exit "$rc"
fi
log "finished: $(cat "$RUN_DIR/export.json" 2>/dev/null || echo "no export.json (export=false)")"
