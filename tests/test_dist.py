"""The one reader of the distributed environment (lsm_dist.dist), and the scrubbing of
rendezvous variables before a child process or Slurm job is started."""

from __future__ import annotations

import os

from lsm_dist.dist import DIST_VARS, expand_nodelist, launch_env, read_env, scrubbed_environ


def test_expand_nodelist():
    assert expand_nodelist("c[1-2]") == ["c1", "c2"]
    assert expand_nodelist("gpu[007-009,12],login-a") == ["gpu007", "gpu008", "gpu009", "gpu12", "login-a"]
    assert expand_nodelist("node5") == ["node5"]


def test_read_env_sources():
    assert read_env({}).source == "single" and read_env({}).world_size == 1
    tr = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (tr.source, tr.rank, tr.world_size, tr.node_rank, tr.num_nodes, tr.master_port) == (
        "torchrun", 3, 8, 0, 2, 1234)
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
             "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "c[1-2]", "SLURM_JOB_ID": "123456"}
    env = read_env(slurm)
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
            env.master_addr, env.master_port) == ("slurm", 3, 4, 1, 2, 1, "c1", 20000 + 3456)
    # an inherited MASTER_PORT (from whatever process submitted the job) is not the job's port
    assert read_env({**slurm, "MASTER_PORT": "43337"}).master_port == 23456
    assert read_env({**slurm, "LSM_MASTER_PORT": "29999"}).master_port == 29999
    arr = read_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert arr.worker_slot() == (1, 3)


def test_launch_env_and_scrubbed_environ(monkeypatch):
    for k in DIST_VARS:
        monkeypatch.setenv(k, "7")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("LSM_KEEP_ME", "1")
    env = launch_env()
    assert not set(DIST_VARS) & set(env) and "ACCELERATE_USE_DEEPSPEED" not in env
    assert env["LSM_KEEP_ME"] == "1" and env["PATH"] == os.environ["PATH"]
    with scrubbed_environ():
        assert not set(DIST_VARS) & set(os.environ) and os.environ["LSM_KEEP_ME"] == "1"
    assert all(os.environ[k] == "7" for k in DIST_VARS)
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"


def test_balanced_share_splits_by_size():
    from lsm_dist.dist import balanced_share

    items = [f"t{i}" for i in range(10)]
    sizes = [100, 1, 1, 1, 1, 50, 50, 1, 1, 1]  # one large tensor, two middling, small ones
    shares = [balanced_share(items, sizes, k, 2) for k in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(items) and not set(shares[0]) & set(shares[1])
    loads = [sum(sizes[items.index(x)] for x in s) for s in shares]
    assert max(loads) <= 1.05 * sum(sizes) / 2  # split by count (items[k::2]) one task did 153 of 208
    assert balanced_share(items, sizes, 0, 1) == items
    assert all(s == sorted(s, key=items.index) for s in shares)  # each share in the items' order
