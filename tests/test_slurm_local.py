"""Tests against the real one-host Slurm cluster from ``tools/slurm-local.sh start``.

Two emulated nodes (c1, c2) on one host; skipped when Slurm is absent or not answering.
Every job gets its own ``tmp_path`` folder and writes only there.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

SUBMIT_TIMEOUT_S = 90  # per sbatch --wait; the whole file takes ~10 s on an idle cluster
STANDIN_MARK = "lsm-slurm sacct stand-in"


def _run(
    *cmd: str, timeout: float = 15, check: bool = True, env=None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=check, env=env
    )


def _cluster_problem() -> str | None:
    for tool in ("sinfo", "sbatch", "srun", "squeue", "sacct"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH (start the cluster with: tools/slurm-local.sh start)"
    try:
        res = _run("sinfo", "-h", "-N", "-o", "%N %t", timeout=15, check=False)
    except subprocess.TimeoutExpired:
        return "Slurm cluster does not respond (sinfo timed out); run tools/slurm-local.sh start"
    if res.returncode != 0:
        return f"Slurm cluster does not respond (sinfo: {res.stderr.strip()[:200]}); run tools/slurm-local.sh start"
    usable = set()
    for line in res.stdout.splitlines():
        node, _, state = line.partition(" ")
        # a trailing '*' means "not responding"; ~#!%$@^- are power/maintenance suffixes
        if not state.endswith("*") and state.rstrip("~#!%$@^-") in ("idle", "mix", "alloc", "comp"):
            usable.add(node)
    if len(usable) < 2:
        return f"need 2 responding Slurm nodes, sinfo says: {res.stdout.strip()!r}"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    problem = _cluster_problem()
    if problem:
        if os.environ.get("LSM_REQUIRE_SLURM") == "1":  # CI: the cluster must be there
            pytest.fail(f"LSM_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


def _sbatch(*args: str) -> str:
    """``sbatch --parsable ARGS``; returns the job id."""
    res = _run("sbatch", "--parsable", "--time=2", *args)
    job_id = res.stdout.strip().split(";")[0]
    assert job_id.isdigit(), res.stdout
    return job_id


def _sbatch_wait(*args: str) -> str:
    """``sbatch --wait --parsable ARGS``; returns the job id once the job (or array) has finished."""
    res = _run(
        "sbatch", "--wait", "--parsable", "--time=2", *args, timeout=SUBMIT_TIMEOUT_S, check=False
    )
    assert res.returncode == 0, (
        f"sbatch rc={res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    )
    job_id = res.stdout.strip().splitlines()[0].split(";")[0]
    assert job_id.isdigit(), res.stdout
    return job_id


def _sacct(*job_ids: str, env=None) -> dict[str, dict[str, str]]:
    """submitit's exact sacct query, parsed with submitit's own parser."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    cmd = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
    for jid in job_ids:
        cmd += ["-j", jid]
    res = _run(*cmd, env=env)
    assert res.stdout.splitlines()[0] == "JobID|State|NodeList", res.stdout
    return SlurmInfoWatcher().read_info(res.stdout)


def test_two_node_job_runs_one_task_per_node(tmp_path: Path) -> None:
    out = tmp_path / "tasks.txt"
    script = tmp_path / "two_node.sh"
    script.write_text(
        "#!/bin/bash\n"
        "set -e\n"
        # one line per task: rank, node index, node name
        f"srun bash -c 'echo \"$SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $SLURM_NTASKS\"' > {out}\n"
    )
    job_id = _sbatch_wait(
        "-N",
        "2",
        "--ntasks-per-node=1",
        f"--chdir={tmp_path}",
        "-o",
        str(tmp_path / "slurm-%j.out"),
        str(script),
    )
    lines = sorted(out.read_text().split("\n")[:-1])
    assert len(lines) == 2, f"job {job_id}: {out.read_text()!r}"
    rows = [line.split() for line in lines]
    assert {r[0] for r in rows} == {"0", "1"}, rows  # distinct SLURM_PROCID
    assert {r[1] for r in rows} == {"0", "1"}, rows  # distinct SLURM_NODEID
    assert {r[2] for r in rows} == {"c1", "c2"}, rows  # one task on each emulated node
    assert all(r[3] == "2" for r in rows), rows

    info = _sacct(job_id)
    assert info[job_id]["State"] == "COMPLETED", info
    assert info[job_id]["NodeList"] in ("c[1-2]", "c1,c2"), info


def test_array_job(tmp_path: Path) -> None:
    job_id = _sbatch_wait(
        "--array=0-2",
        f"--chdir={tmp_path}",
        "-o",
        str(tmp_path / "arr_%A_%a.out"),
        "--wrap",
        'echo "task=$SLURM_ARRAY_TASK_ID of=$SLURM_ARRAY_JOB_ID n=$SLURM_ARRAY_TASK_COUNT"',
    )
    for task in range(3):
        text = (tmp_path / f"arr_{job_id}_{task}.out").read_text()
        assert text.strip() == f"task={task} of={job_id} n=3", text

    info = _sacct(job_id)  # sacct -j ARRAY_ID answers for every task, as "ID_task"
    for task in range(3):
        assert info[f"{job_id}_{task}"]["State"] == "COMPLETED", info


def test_sacct_reports_finished_jobs(tmp_path: Path) -> None:
    # no `sbatch --wait` here: it polls after 2 s, then 8 s more; polling sacct is quicker
    ok = _sbatch("-o", str(tmp_path / "ok.out"), "--wrap", "true")
    bad = _sbatch("-o", str(tmp_path / "bad.out"), "--wrap", "exit 3")
    deadline = time.monotonic() + 60
    while True:
        info = _sacct(ok, bad)
        states = [info.get(j, {}).get("State", "UNKNOWN") for j in (ok, bad)]
        if not set(states) & {"UNKNOWN", "PENDING", "RUNNING", "COMPLETING", "REQUEUED"}:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.25)
    assert info[ok]["State"] == "COMPLETED", info
    assert info[bad]["State"] == "FAILED", info

    res = _run("sacct", "-P", "-n", "-X", "-o", "JobID,State,ExitCode", "-j", bad)
    assert res.stdout.strip().splitlines() == [f"{bad}|FAILED|3:0"], res.stdout

    sacct = Path(shutil.which("sacct") or "")
    if STANDIN_MARK not in sacct.read_text(errors="replace"):
        return  # a real sacct (accounting database): nothing stand-in specific to check
    # finished jobs stay answerable after squeue forgets them (MinJobAge): simulate a
    # controller that no longer knows any job -> answers must come from the cache
    empty = tmp_path / "empty-tool"
    empty.write_text("#!/bin/sh\nexit 0\n")
    empty.chmod(empty.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, LSM_SACCT_SQUEUE=str(empty), LSM_SACCT_SCONTROL=str(empty))
    cached = _sacct(ok, bad, env=env)
    assert cached[ok]["State"] == "COMPLETED", cached
    assert cached[bad]["State"] == "FAILED", cached
    # default (non-parsable) sacct output is column aligned with a dashed rule
    res = _run("sacct", "-j", ok, "-o", "JobID,State", env=env)
    assert re.search(rf"^\s*{ok}\s+COMPLETED\s*$", res.stdout, re.M), res.stdout


@pytest.mark.timeout(120)
def test_submitit_job_returns_result(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")

    def answer() -> int:  # defined locally: cloudpickle ships it by value to the job
        return 6 * 7

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(
        slurm_partition="debug", timeout_min=5, nodes=1, tasks_per_node=1, cpus_per_task=1
    )
    job = executor.submit(answer)
    assert job.result() == 42  # submitit polls `sacct` (the stand-in here) while waiting
    # the result file appears just before the job ends; then sacct must say COMPLETED
    deadline = time.monotonic() + 30
    while (state := job.get_info(mode="force").get("State")) != "COMPLETED":
        assert time.monotonic() < deadline, f"job {job.job_id} state {state!r}"
        time.sleep(0.5)


def test_local_cluster_state_is_private() -> None:
    """tools/slurm-local.sh keeps its state in a private root directory (0700): no predictable
    /tmp paths, no group- or world-writable files (the sacct cache was 0666 under /tmp)."""
    conf = Path("/etc/slurm/slurm.conf")
    if not conf.is_file() or "Generated by tools/slurm-local.sh" not in conf.read_text():
        pytest.skip("not the cluster of tools/slurm-local.sh")
    settings = dict(line.split("=", 1) for line in conf.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))  # fmt: skip
    state = Path(settings["StateSaveLocation"]).parent
    assert not str(state).startswith("/tmp"), state
    for key in ("SlurmctldPidFile", "SlurmdPidFile", "SlurmctldLogFile", "SlurmdLogFile", "SlurmdSpoolDir"):
        assert Path(settings[key]).is_relative_to(state), (key, settings[key])
    st = state.lstat()
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    loose = [p for p in state.rglob("*") if p.lstat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)]
    assert not loose, loose
    sacct = Path(shutil.which("sacct") or "")
    text = sacct.read_text(errors="replace")
    if STANDIN_MARK in text:
        cache = Path(re.search(r"^CACHE=(\S+)", text, re.M).group(1))
        assert cache.parent == state and "LSM_SACCT_CACHE" not in text
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600 and cache.stat().st_uid == 0
