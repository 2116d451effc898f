"""The one place that reads the distributed environment.

torchrun / accelerate set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; srun sets
SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST; a Slurm array task sets
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT. Nothing else in lsm_dist touches these variables.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

# what a launcher sets for the processes it starts; a job or child process submitted from inside
# a distributed (or formerly distributed) process must not inherit them, or it joins the wrong
# rendezvous (seen: two submitit sweep points both binding the parent's MASTER_PORT)
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
             "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def launch_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) without the rendezvous variables and accelerate's
    ``ACCELERATE_*`` settings: the environment for a fresh child process or Slurm job."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k not in DIST_VARS and not k.startswith("ACCELERATE_")}


@contextlib.contextmanager
def scrubbed_environ() -> Iterator[None]:
    """Temporarily drop what :func:`launch_env` drops from ``os.environ`` (for libraries that
    start jobs with the current environment, e.g. submitit's sbatch)."""
    keep = launch_env()
    saved = {k: v for k, v in os.environ.items() if k not in keep}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"
    array_task_id: int | None = None
    array_task_count: int | None = None
    job_id: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def worker_slot(self) -> tuple[int, int]:
        """(index, count) for work split across ranks *or* Slurm array tasks."""
        if self.array_task_id is not None and self.array_task_count:
            return self.array_task_id, self.array_task_count
        return self.rank, self.world_size


def balanced_share(items: list, sizes: list[float], index: int, count: int) -> list:
    """Worker ``index``'s share of ``items`` when ``count`` workers split them by size: longest
    first, each to the least-loaded worker (ties to the lower index), so the slowest worker
    does barely more than the mean; deterministic, so every worker computes the same split
    without talking to the others. Returns the share in the items' own order."""
    if count <= 1:
        return list(items)
    load = [0.0] * count
    owner = {}
    for i in sorted(range(len(items)), key=lambda i: (-sizes[i], i)):
        w = min(range(count), key=lambda k: (load[k], k))
        owner[i] = w
        load[w] += sizes[i]
    return [x for i, x in enumerate(items) if owner[i] == index]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist such as ``c[1-2,5],gpu-a07`` into host names."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                width = len(lo)
                hosts += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(prefix + part)
    return [h for h in hosts if h]


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int | None:
    v = env.get(key)
    return int(v) if v not in (None, "") else default


def read_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank / world / local rank / master address from torchrun, accelerate or Slurm."""
    env = os.environ if env is None else env
    task_id = _int(env, "SLURM_ARRAY_TASK_ID")
    if task_id is not None:  # arrays may start at any index (--array=1-4): count from its min
        task_id -= _int(env, "SLURM_ARRAY_TASK_MIN", 0) or 0
    array = dict(
        array_task_id=task_id,
        array_task_count=_int(env, "SLURM_ARRAY_TASK_COUNT"),
        job_id=env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID"),
    )
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, accelerate, deepspeed launchers
        world = int(env["WORLD_SIZE"])
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        rank = int(env["RANK"])
        return DistEnv(
            rank=rank,
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", rank // max(local_world, 1)),
            num_nodes=max(world // max(local_world, 1), 1),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
            source="torchrun",
            **array,
        )
    if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:  # srun, one task per rank
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        world = int(env["SLURM_NTASKS"])
        local_world = world // max(_int(env, "SLURM_NNODES", len(nodes)) or 1, 1)
        job = env.get("SLURM_JOB_ID", "0")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=max(local_world, 1),
            node_rank=_int(env, "SLURM_NODEID", 0),
            num_nodes=_int(env, "SLURM_NNODES", len(nodes)),
            master_addr=nodes[0] if nodes else "127.0.0.1",
            master_port=_int(env, "LSM_MASTER_PORT", 20000 + int(job) % 10000),
            source="slurm",
            **array,
        )
    return DistEnv(source="single", **array)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_torch_env(env: DistEnv | None = None, single_process: bool = False) -> DistEnv:
    """Export what torch.distributed and accelerate read (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) where no launcher did: under srun / submitit
    multi-task jobs (always, over any inherited values), and with ``single_process`` for a lone
    process (a world of 1 on a free local port, keeping values the user set).

    Does nothing when a launcher (torchrun, accelerate) already set them.
    """
    env = read_env() if env is None else env
    if env.source == "slurm":
        os.environ.update(
            RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
            LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
            MASTER_PORT=str(env.master_port), GROUP_RANK=str(env.node_rank),
        )
    elif env.source == "single" and single_process:
        for k, v in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1),
                     ("MASTER_ADDR", env.master_addr)):
            os.environ.setdefault(k, str(v))
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
    return env
