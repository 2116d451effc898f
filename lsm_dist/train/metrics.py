"""Rank-0 metric sinks (TensorBoard + metrics.jsonl), per-rank log files, and MFU.

Only rank 0 creates a :class:`MetricsWriter` that writes; the others get one that does
nothing. On resume from step S the records of later steps (written by the run that was
killed) are dropped from ``metrics.jsonl`` and TensorBoard is told to purge them
(``purge_step``), so both show one continuous curve; a fresh start in a run directory whose
earlier run died before its first complete checkpoint drops all of them (and its event files).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from lsm_dist.utils import atomic_write_text, get_logger

# dense bf16 tensor-core peak FLOP/s per GPU (no sparsity)
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of the CUDA device (None on CPU or for an unknown GPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # most specific names first
        if key in name:
            return flops
    return None


def rank_logger(run_dir: Path, rank: int) -> logging.Logger:
    """Each rank logs to ``run_dir/logs/rank<r>.log``; rank 0 also through the project's logger
    ``lsm`` (the console, or a command's log file inside a ``console.session``)."""
    logger = logging.getLogger(f"lsm.train.rank{rank}")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    fh.setFormatter(fmt)
    logger.addHandler(fh)
    logger.setLevel(logging.INFO)
    logger.propagate = rank == 0  # lsm.train.rank0 -> lsm
    if rank == 0:
        get_logger()  # ``lsm`` set up
    return logger


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
            atomic_write_text(self.path, "".join(x + "\n" for x in keep))
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None
        if resume_step is not None and resume_step < 0:  # a fresh start: the dead run's event files go
            for f in (run_dir / "tb").glob("events.out.tfevents.*"):
                if f.is_file() and not f.is_symlink():
                    f.unlink()
            purge = None
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
        self.f = open(self.path, "a")  # noqa: SIM115 (open for the run; closed by close())

    def log(self, step: int, kind: str, scalars: dict[str, float], tb: bool = True) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items() if tb else ():
            if v is not None and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        rec = {"step": step, "kind": kind, **{k: v for k, v in scalars.items() if v is not None}}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.flush()
            self.tb.close()
            self.f.close()
            self.enabled = False


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """Records of ``metrics.jsonl`` (optionally of one kind: train / val / stage / final)."""
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if kind is None or rec.get("kind") == kind:
            out.append(rec)
    return out
