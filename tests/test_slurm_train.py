"""Cluster execution on the real local Slurm cluster (tools/slurm-local.sh: nodes c1, c2):
2-node VAE training through slurm/train_vae.sh, preemption -> requeue -> resume, a killed job
resubmitted, a multi-node submitit train sweep, the merge as array jobs + assembly, and the
fail-fast submit checks. Every test checks what was written, not only exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lsm_dist.corpus import ConvertConfig, run_convert
from lsm_dist.model import load_vae
from lsm_dist.sweep import SlurmParams, SweepConfig, expand, load_sweep, run_sweep
from lsm_dist.train import checkpointing as ck
from lsm_dist.train.metrics import read_metrics
from tests.helpers import llama_tensors, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "train" / "tiny.yaml")
# the tiny config, shortened; every run logs every 5 steps, checkpoints every 10
SHORT = ["warmup_steps=2", "beta_warmup_steps=2", "log_every=5", "val_every=10", "ckpt_every=10"]


# ---- helpers -------------------------------------------------------------------------------------
def sh(*cmd: str, timeout: float = 60, check: bool = True, env=None) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                         env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def job_env(**kw: str) -> dict[str, str]:
    return {**os.environ, "LSM_REPO": str(REPO), **kw}


def sbatch(tmp: Path, *args: str, env=None) -> str:
    out = sh("sbatch", "--parsable", "--time=5", f"--chdir={REPO}", f"--output={tmp}/%x-%j.out",
             *args, env=env or job_env()).stdout
    return out.strip().split(";")[0]


def state(jid: str) -> tuple[str, str]:
    """(state, reason) of a job; ("", "") once the controller forgot it."""
    out = sh("squeue", "-h", "--states=all", "-j", jid, "-o", "%T|%r", check=False).stdout.strip()
    return tuple(out.splitlines()[0].split("|", 1)) if out else ("", "")  # type: ignore[return-value]


def wait_for(pred, timeout: float, what: str, period: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(period)


def wait_done(jid: str, timeout: float = 240) -> str:
    running = ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "SUSPENDED")
    return wait_for(lambda: (s := state(jid)[0]) not in running and s, timeout, f"job {jid}")


def complete_steps(run_dir: Path) -> list[int]:
    return [s for s, _ in ck.list_checkpoints(run_dir)]


def tb_steps(run_dir: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.step for e in ea.Scalars(tag)]


def check_exported_vae(run_dir: Path, step: int, latent_dim: int = 32) -> None:
    export = json.loads((run_dir / "export.json").read_text())
    assert export["step"] == step and Path(export["checkpoint"]).name == f"step-{step:08d}"
    vae = load_vae(run_dir / "vae")
    assert vae.cfg.latent_dim == latent_dim and vae.cfg.chunk == 64
    with torch.no_grad():
        out = vae(torch.randn(3, 8, 64), sample=False)
    assert out["x_hat"].shape == (3, 8, 64) and torch.isfinite(out["x_hat"]).all()


def check_checkpoint(path: Path, world: int = 2) -> dict:
    state_ = ck.read_state(path)
    assert (path / ck.COMPLETE).is_file() and state_["world_size"] == world
    for r in range(world):  # per-rank RNG and ZeRO optimizer shards
        assert (path / f"random_states_{r}.pkl").is_file()
        assert (path / ck.DS_TAG / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file()
    return state_


def train_log_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir, "train")]


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slurm_train_data")
    models = [write_checkpoint(d / f"m{s}", llama_tensors(layers=2, hidden=64, inter=128, seed=s,
                                                          dtype=torch.float32)) for s in (1, 2)]
    run_convert(ConvertConfig(models=[str(m) for m in models], out_dir=str(d / "corpus"), tokens=8,
                              chunk=64, block_samples=8, shard_samples=32), progress=False)
    return d / "corpus"


@pytest.fixture
def cancel_after():
    """Job ids appended here are cancelled when the test ends (a failed test leaves no job
    behind, e.g. a requeued one waiting for its BeginTime)."""
    ids: list[str] = []
    yield ids
    if ids:
        sh("scancel", *ids, check=False)


# ---- no cluster needed ---------------------------------------------------------------------------
def test_sweep_files_expand():
    pts = expand(load_sweep(REPO / "configs/sweeps/train_ratio_beta.yaml"))
    assert len(pts) == 8
    ratios = {c.model.compression_ratio for _, _, c in pts}
    assert ratios == {4.0, 8.0} and all(c.model.chunk == 64 for _, _, c in pts)  # over model_config
    assert {(c.beta, c.lr) for _, _, c in pts} == {(b, lr) for b in (1e-4, 1e-3) for lr in (1e-3, 2e-3)}
    pts = expand(load_sweep(REPO / "configs/sweeps/merge_lambda.yaml"))
    assert {(c.method, c.params.lambda_) for _, _, c in pts} == {
        (m, x) for m in ("lerp", "slerp") for x in (0.0, 0.25, 0.5, 0.75, 1.0)}
    assert len({c.out_dir for _, _, c in pts}) == 10


def test_train_script_refuses_bad_input_before_slurm(corpus, tmp_path):
    res = sh("bash", "slurm/train_vae.sh", str(tmp_path / "missing.yaml"), check=False)
    assert res.returncode == 2 and "missing.yaml' does not exist" in res.stderr, res.stderr
    res = sh("bash", "slurm/train_vae.sh", "corpus=/x", check=False)
    assert res.returncode == 2 and "first argument must be the training config" in res.stderr
    res = sh("bash", "slurm/train_vae.sh", "--check", TINY, f"corpus={tmp_path}/none", check=False)
    assert res.returncode == 2 and "corpus directory does not exist" in res.stderr, res.stderr
    res = sh("bash", "slurm/train_vae.sh", "--check", TINY, f"corpus={corpus}", "lr=-1", check=False)
    assert res.returncode == 2 and "lr: must be > 0" in res.stderr, res.stderr
    res = sh("bash", "slurm/train_vae.sh", TINY, f"corpus={corpus}", check=False)  # not in a job
    assert res.returncode == 2 and "not inside a Slurm job" in res.stderr, res.stderr


# ---- on the cluster ------------------------------------------------------------------------------
@pytest.mark.slurm
def test_two_node_training_with_sbatch(corpus, tmp_path, slurm_cluster):
    """sbatch --wait -N 2 slurm/train_vae.sh: one accelerate launcher per node, 2 gloo ranks with
    the rendezvous on c1; checkpoints, logs of both ranks, TensorBoard, metrics, exported VAE."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    res = sh("sbatch", "--wait", "--parsable", "-N", "2", "--time=5", f"--chdir={REPO}",
             f"--output={tmp_path}/%x-%j.out", "slurm/train_vae.sh", TINY, f"corpus={corpus}",
             f"run_dir={run}", "stage1_steps=12", "stage2_steps=8", *SHORT, timeout=300,
             check=False, env=job_env())
    jid = res.stdout.strip().split(";")[0]
    out = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert res.returncode == 0, f"{res.stderr}\n{out}"
    print(f"2-node sbatch job: {time.monotonic() - t0:.1f}s")
    assert state(jid)[0] == "COMPLETED"
    log = (run / "logs" / f"slurm-{jid}.log").read_text()
    assert re.search(rf"on c\[1-2\]: 2 node\(s\) x 1 rank\(s\), rendezvous c1:{20000 + int(jid) % 10000}", log), log
    assert "accelerate.commands.launch" in log and "--machine_rank @NODE_RANK@" in log
    assert "finished" in log
    for r in (0, 1):  # each rank logged itself and every checkpoint it took part in
        text = (run / "logs" / f"rank{r}.log").read_text()
        assert f"rank {r}/2 on cpu, ZeRO-2" in text, text
        assert "checkpoint" in text and f"{run}/checkpoints/step-00000020" in text
        assert (run / "logs" / f"node{r}-{jid}.log").is_file()  # one launcher per node
    final = json.loads((run / "logs" / f"node0-{jid}.log").read_text().strip().splitlines()[-1])
    assert final["step"] == 20 and final["vae"] == str(run / "vae")
    assert complete_steps(run) == [10, 20]
    st = check_checkpoint(run / "checkpoints" / "step-00000020")
    assert st["step"] == 20 and st["stage"] == 2
    assert (run / "config.yaml").read_text().count(str(corpus)) == 1  # the resolved config
    assert train_log_steps(run) == [5, 10, 15, 20]
    assert tb_steps(run) == [5, 10, 15, 20]
    assert read_metrics(run, "final")[0]["val/recon"] > 0
    assert not (run / "PREEMPTED").exists()
    check_exported_vae(run, 20)


@pytest.mark.slurm
def test_preempt_requeue_resume_then_kill_and_resubmit(corpus, tmp_path, slurm_cluster, cancel_after):
    """USR2 (what Slurm sends 120 s before the limit) -> checkpoint + PREEMPTED -> scontrol requeue
    -> the same job resumes; then the job's processes are SIGKILLed (a dead node): the job fails
    with a message, a new submission resumes from the last complete checkpoint and finishes."""
    run = tmp_path / "run"
    args = ["slurm/train_vae.sh", TINY, f"corpus={corpus}", f"run_dir={run}", "stage1_steps=60",
            "stage2_steps=60", *SHORT]
    env = job_env(LSM_LAUNCHER="torchrun")
    t0 = time.monotonic()
    jid = sbatch(tmp_path, "-N", "2", *args, env=env)
    cancel_after.append(jid)
    wait_for(lambda: complete_steps(run), 180, "the first checkpoint")
    sh("scancel", "--signal=USR2", jid)  # to every process of the job steps (see train_vae.sh)
    wait_for(lambda: state(jid) == ("PENDING", "BeginTime"), 60, "the requeue")
    marker = json.loads((run / "PREEMPTED").read_text())
    s1 = marker["step"]
    assert 10 <= s1 < 120 and marker["checkpoint"].endswith(f"step-{s1:08d}")
    assert complete_steps(run)[-1] == s1  # the preemption checkpoint
    # Slurm holds a requeued job for cred_expire (30 s on the local cluster, see slurm-local.sh;
    # moving its StartTime earlier makes the launch fail with "Job credential revoked")
    log = run / "logs" / f"slurm-{jid}.log"
    wait_for(lambda: "(restart 1)" in log.read_text(), 120, "the requeued job to start")
    print(f"preempted at step {s1}, requeued: {time.monotonic() - t0:.1f}s")

    # the requeued job resumes from s1; once it has checkpointed past s1, kill every process
    rank0 = run / "logs" / "rank0.log"
    wait_for(lambda: f"resumed from {run}/checkpoints/step-{s1:08d} at step {s1}" in rank0.read_text(),
             120, "the resume")
    assert not (run / "PREEMPTED").exists()  # removed when the resumed run started
    wait_for(lambda: complete_steps(run)[-1] > s1, 60, "a checkpoint after the resume")
    steps = sh("squeue", "-h", "-s", "-j", jid, "-o", "%i").stdout.split()
    step_ids = [s for s in steps if re.fullmatch(rf"{jid}\.\d+", s)]
    assert step_ids, steps
    sh("scancel", "--signal=KILL", *step_ids)  # SIGKILL to launchers and ranks on both nodes
    assert wait_done(jid, 60) == "FAILED"
    text = log.read_text()
    assert "FAILED: training step exited with status" in text and "resumes from" in text, text
    assert text.count("requeueing job") == 1
    s2 = complete_steps(run)[-1]
    assert s1 < s2 < 120, s2
    print(f"killed after step {s2}: {time.monotonic() - t0:.1f}s")

    # a new submission continues from s2 and finishes
    jid2 = sbatch(tmp_path, "-N", "2", *args, env=env)
    cancel_after.append(jid2)
    assert wait_done(jid2) == "COMPLETED", (run / "logs" / f"slurm-{jid2}.log").read_text()
    print(f"resubmitted job finished: {time.monotonic() - t0:.1f}s")
    assert f"resumed from {run}/checkpoints/step-{s2:08d} at step {s2}" in rank0.read_text()
    assert (run / "logs" / "rank1.log").read_text().count("resumed from") == 2
    # one continuous history: every logged step once, in order, in metrics.jsonl and TensorBoard
    assert train_log_steps(run) == list(range(5, 121, 5))
    assert tb_steps(run) == list(range(5, 121, 5))
    assert [r["step"] for r in read_metrics(run, "stage")] == [0, 60]
    assert [r["step"] for r in read_metrics(run, "val")] == list(range(10, 121, 10))
    assert complete_steps(run) == [110, 120]
    assert not list((run / "checkpoints").glob("*.tmp"))
    check_checkpoint(run / "checkpoints" / "step-00000120")
    check_exported_vae(run, 120)
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 3  # one per run


@pytest.mark.slurm
def test_multinode_submitit_train_sweep(corpus, tmp_path, slurm_cluster, monkeypatch):
    """Two sweep points (compression ratio 4x and 8x), each a 2-node submitit job whose tasks are
    the ranks (export_torch_env: SLURM_PROCID -> RANK, env:// rendezvous on the first node).
    Submitted from a process that holds rendezvous variables of its own (as after an in-process
    training run): the jobs must not inherit them (both points once bound the same port)."""
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "43337"), ("RANK", "0"),
                 ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(k, v)
    cfg = SweepConfig(
        kind="train", base=TINY, grid={"model.latent_dim": [32, 16]}, run_dir=str(tmp_path / "sweep"),
        overrides=[f"corpus={corpus}", "stage1_steps=6", "stage2_steps=4", *SHORT], executor="slurm",
        slurm=SlurmParams(nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5))
    t0 = time.monotonic()
    rows = run_sweep(cfg)
    print(f"2-point multi-node sweep: {time.monotonic() - t0:.1f}s")
    assert [r["point"] for r in rows] == ["latent_dim=32", "latent_dim=16"]
    jobs = json.loads(Path(cfg.run_dir, "jobs.json").read_text())
    assert all("_" in j for j in jobs.values()), jobs  # one array, a task per point
    for r, dim in zip(rows, (32, 16)):
        run = Path(cfg.run_dir) / r["point"]
        assert r["step"] == 10 and r["vae"] == str(run / "vae") and r["val/recon"] > 0
        assert json.loads((run / "result.json").read_text())["step"] == 10
        for rank in (0, 1):
            assert f"rank {rank}/2 on cpu" in (run / "logs" / f"rank{rank}.log").read_text()
        check_checkpoint(run / "checkpoints" / "step-00000010")
        assert train_log_steps(run) == [5, 10] and tb_steps(run) == [5, 10]
        check_exported_vae(run, 10, latent_dim=dim)
    table = Path(cfg.run_dir, "results.md").read_text()
    assert "latent_dim=16" in table and "val/recon" in table
    assert Path(cfg.run_dir, "results.csv").read_text().count("\n") == 3


@pytest.mark.slurm
def test_merge_array_and_assembly(tmp_path, slurm_cluster, cancel_after):
    """slurm/submit_merge.sh: encode array -> finalize -> merge array -> assembly; the checkpoint
    loads with transformers and equals the merge run in one process."""
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lsm_dist.merge import is_complete, load_plan, run_merge
    from tests.merge_helpers import build_model, perturbed_expert, train_tiny_vae

    torch.set_num_threads(1)
    base = build_model("llama", tmp_path / "base", 64, 4, 128, seed=0)
    expert = perturbed_expert(base, tmp_path / "expert", seed=1)
    vae = train_tiny_vae([base, expert], tmp_path / "vae", steps=60)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "models": {"base": str(base), "expert": str(expert)}, "method": "slerp",
        "params": {"lambda": 0.4}, "vae": str(vae), "out_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"), "batch_size": 16, "max_shard_size": "60KB"}))
    t0 = time.monotonic()
    env = job_env(LSM_SBATCH_ARGS=f"--chdir={REPO} --output={tmp_path}/%x-%A_%a.out --time=5")
    res = sh("bash", "slurm/submit_merge.sh", "2", str(plan), env=env)
    ids = dict(zip(*[iter(res.stdout.split())] * 2))
    cancel_after.extend(j for j in ids.values() if j.isdigit())
    assert set(ids) == {"encode", "finalize", "merge", "assemble"} and "-" not in ids.values(), res.stdout
    done = wait_done(ids["assemble"], 240)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("lsm-merge-*.out")))
    assert done == "COMPLETED", logs
    print(f"merge array + assembly: {time.monotonic() - t0:.1f}s")
    assert len(re.findall(r"encode worker \d/2: \d+ tensor\(s\) encoded", logs)) == 2, logs
    assert len(re.findall(r"merge worker \d/2: 2 layer file\(s\) written", logs)) == 2, logs
    model_dir = tmp_path / "out" / "model"
    assert is_complete(model_dir) and len(list((tmp_path / "out" / "layers").glob("*.safetensors"))) == 4
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 40, 41, 42, 5]])).logits
    assert torch.isfinite(logits).all()
    # the array job wrote exactly what one process writes
    ref = run_merge(load_plan(plan, [f"out_dir={tmp_path / 'ref'}", f"cache_dir={tmp_path / 'c2'}"]))
    got, want = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
                 for d in (model_dir, ref))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slurm
def test_submit_merge_stops_when_sbatch_fails(tmp_path, slurm_cluster):
    """A refused sbatch stops slurm/submit_merge.sh with its message and a non-zero status (it
    printed empty job ids and exited 0); a later refusal cancels the jobs already queued."""
    import yaml

    from tests.helpers import fake_sbatch_env
    from tests.merge_helpers import build_model

    base = build_model("llama", tmp_path / "base", 32, 2, 64, seed=0)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"models": {"a": str(base), "b": str(base)}, "method": "linear",
                                    "space": "weight", "out_dir": str(tmp_path / "out")}))
    # the real sbatch refuses a partition the cluster does not have
    res = sh("bash", "slurm/submit_merge.sh", "2", str(plan), check=False,
             env=job_env(LSM_SBATCH_ARGS="--partition=lsm-no-such-partition"))
    assert res.returncode == 1 and "sbatch failed" in res.stderr, res
    assert "invalid partition" in res.stderr.lower() and "merge" not in res.stdout, res
    # the second submission refused: the first job is cancelled, nothing else is submitted
    res = sh("bash", "slurm/submit_merge.sh", "2", str(plan), check=False, env=fake_sbatch_env(tmp_path, fail_from=2))
    assert res.returncode == 1 and "cancelled 1" in res.stderr, res
    assert (tmp_path / "scancel-calls").read_text().split() == ["1"]
    assert len((tmp_path / "sbatch-calls").read_text().splitlines()) == 2


@pytest.mark.slurm
def test_submit_fails_fast(corpus, tmp_path, slurm_cluster, cancel_after):
    """More nodes than the cluster has: refused at once with a message, nothing queued; a missing
    config fails the job at once, before any srun step."""
    name = f"lsm-capacity-{os.getpid()}"
    env = job_env(LSM_SBATCH_ARGS=f"--job-name={name} --time=5")
    t0 = time.monotonic()
    res = sh("bash", "slurm/submit_train.sh", "3", TINY, f"corpus={corpus}",
             f"run_dir={tmp_path / 'run'}", check=False, env=env)
    assert res.returncode == 3, res
    assert "3 node(s) requested, but partition 'debug' has only 2 node(s) up" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 30 and res.stdout == ""
    assert sh("squeue", "-h", "--states=all", "-n", name).stdout.strip() == ""
    res = sh("bash", "slurm/submit_train.sh", "2", str(tmp_path / "nope.yaml"), check=False, env=env)
    assert res.returncode == 2 and "nope.yaml' does not exist" in res.stderr
    # submitted by hand with a config that is not there: fails in the batch script, no step
    jid = sbatch(tmp_path, "-N", "2", "slurm/train_vae.sh", str(tmp_path / "missing.yaml"))
    cancel_after.append(jid)
    assert wait_done(jid, 60) == "FAILED"
    out = (tmp_path / f"lsm-train-{jid}.out").read_text()
    assert "missing.yaml' does not exist" in out and "srun" not in out, out
