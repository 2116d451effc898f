"""VAE trainer: configs, schedule, held-out split, fail-fast checks, and real 2-process runs
(accelerate launch ZeRO-2 / ZeRO-3, torchrun kill -> resume, single-process NaN stop)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lsm_dist.config import ConfigError, load_config
from lsm_dist.corpus import ConvertConfig, CorpusError, run_convert
from lsm_dist.corpus.reader import Corpus, make_loader
from lsm_dist.model import TransformerVAE, VAEConfig, load_vae
from lsm_dist.train import (
    CheckpointError,
    TrainConfig,
    export_vae,
    list_checkpoints,
    load_train_config,
    run_train,
)
from lsm_dist.train import checkpointing as ck
from lsm_dist.train.data import TrainStream, blocks_of, choose_holdout, load_eval_set
from lsm_dist.train.loop import Progress, StageSchedule, update_plateau
from lsm_dist.train.metrics import read_metrics
from lsm_dist.train.setup import deepspeed_config
from tests.helpers import llama_tensors, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY_VAE = REPO / "configs" / "vae" / "tiny.yaml"
# the runs below share these settings, so the ZeRO-2 accelerate run is the reference of the
# torchrun kill -> resume run
RUN = ["--config", "configs/train/tiny.yaml", "stage1_steps=24", "stage2_steps=16", "log_every=1",
       "val_every=8", "ckpt_every=8", "keep_last_k=2", "warmup_steps=3", "beta_warmup_steps=3"]
TB_TAGS = {"train/loss", "train/recon", "train/recon_loss", "train/kl", "train/beta", "train/lr", "train/grad_norm",
           "train/recon_attn", "train/recon_mlp", "train/stage", "val/recon", "val/recon_attn",
           "val/recon_mlp", "heldout/recon", "perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_ms"}


# ---- fixtures -----------------------------------------------------------------------------------
def structured(layers: int, seed: int, hidden: int = 64, inter: int = 128) -> dict[str, torch.Tensor]:
    """Llama-shaped weights with learnable structure: rows in a 4-dim low-frequency subspace."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in llama_tensors(layers=layers, hidden=hidden, inter=inter, seed=seed, dtype=torch.float32).items():
        if v.dim() == 2 and "layers" in k:
            o, i = v.shape
            f = torch.arange(1, 5, dtype=torch.float32)[:, None]
            basis = torch.cos(2 * torch.pi * f * torch.arange(i)[None, :] / 64 + f)
            w = torch.randn(o, 4, generator=g) @ basis / 2 + 0.05 * torch.randn(o, i, generator=g)
            out[k] = (0.02 * w).contiguous()
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("train_data")
    models = [write_checkpoint(d / f"m{s}", structured(2, s)) for s in (1, 2)]
    other = write_checkpoint(d / "other", structured(1, 3))
    kw = dict(tokens=8, chunk=64, block_samples=8, shard_samples=32)
    run_convert(ConvertConfig(models=[str(m) for m in models], out_dir=str(d / "corpus"), **kw), progress=False)
    run_convert(ConvertConfig(models=[str(other)], out_dir=str(d / "heldout"), **kw), progress=False)
    return {"corpus": d / "corpus", "heldout": d / "heldout", "root": d}



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, args: list[str], accelerate_cfg: str = "zero2_cpu_2proc") -> list[str]:
    if launcher == "accelerate":
        return [PY, "-m", "accelerate.commands.launch", "--config_file",
                f"configs/accelerate/{accelerate_cfg}.yaml", "--main_process_port", str(free_port()),
                "-m", "lsm_dist.train", *args]
    if launcher == "torchrun":
        return [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "lsm_dist.train", *args]
    return [PY, "-m", "lsm_dist.train", *args]


def launch(launcher: str, args: list[str], log: Path, wait: bool = True, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        p = subprocess.Popen(command(launcher, args, **kw), cwd=REPO, env=env, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
    if not wait:
        return p
    return p.wait(timeout=300), log.read_text()


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir, "train")}


def assert_falls(run_dir: Path, stage1: int, stage2: int) -> None:
    loss = train_losses(run_dir)
    s1 = [loss[s] for s in range(1, stage1 + 1)]
    s2 = [loss[s] for s in range(stage1 + 1, stage1 + stage2 + 1)]
    assert sum(s1[-4:]) / 4 < 0.85 * sum(s1[:4]) / 4, s1
    assert sum(s2[-4:]) / 4 < 0.95 * sum(s2[:4]) / 4, s2


# ---- configs ------------------------------------------------------------------------------------
def test_config_files_load():
    for p in sorted((REPO / "configs" / "train").glob("*.yaml")):
        cfg = load_train_config(p)
        assert cfg.model == load_config(VAEConfig, REPO / cfg.model_config), p
    for s in (1, 2, 3):
        ds = json.loads((REPO / f"configs/deepspeed/zero{s}.json").read_text())
        assert ds["zero_optimization"]["stage"] == s and ds["train_micro_batch_size_per_gpu"] == "auto"
    for p in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        a = yaml.safe_load(p.read_text())
        assert a["distributed_type"] == "DEEPSPEED" and "mixed_precision" not in a, p
        assert (REPO / a["deepspeed_config"]["deepspeed_config_file"]).is_file(), p
    assert {p.stem for p in (REPO / "configs" / "accelerate").glob("*.yaml")} >= {
        "zero2_cpu_2proc", "zero3_cpu_2proc", "zero2_gpu"}


def test_config_overrides_and_validation(tmp_path):
    cfg = load_train_config(REPO / "configs/train/tiny.yaml", ["model.latent_dim=16", "lr=1e-3",
                                                                "stage1_plateau.patience=3"])
    assert cfg.model.latent_dim == 16 and cfg.model.chunk == 64 and cfg.lr == 1e-3
    assert cfg.stage1_plateau.patience == 3 and cfg.total_steps == 60
    assert TrainConfig(model_config=str(TINY_VAE)).model == load_config(VAEConfig, TINY_VAE)
    assert cfg.model_digest() != load_train_config(REPO / "configs/train/tiny.yaml").model_digest()
    for bad, field in [(["batch_size=0"], "batch_size"), (["recon=l3"], "recon"),
                       (["zero_stage=4"], "zero_stage"), (["val_fraction=0.7"], "val_fraction"),
                       (["min_lr=1.0"], "min_lr"), (["precision=fp16"], "precision"),
                       (["stage1_steps=0", "stage2_steps=0"], "stage1_steps"),
                       (["model.heads=3"], "heads"), (["nope=1"], "nope")]:
        with pytest.raises(ConfigError, match=field):
            load_train_config(REPO / "configs/train/tiny.yaml", bad)


def test_deepspeed_config_filled_and_checked(tmp_path):
    cfg = TrainConfig(model_config=str(TINY_VAE), batch_size=8, grad_accum=2, grad_clip=0.5)
    ds, path = deepspeed_config(cfg, world_size=2, bf16=False)
    assert path.endswith("zero2.json") and ds["zero_optimization"]["stage"] == 2
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"], ds["bf16"]["enabled"]) == (8, 2, 32, 0.5, False)
    assert "auto" not in json.dumps(ds)
    ds3, _ = deepspeed_config(TrainConfig(model_config=str(TINY_VAE), zero_stage=3), 1, True)
    assert ds3["zero_optimization"]["stage"] == 3 and ds3["bf16"]["enabled"] is True
    fixed = tmp_path / "ds.json"
    fixed.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=4 .* gives 8"):
        deepspeed_config(TrainConfig(model_config=str(TINY_VAE), batch_size=8, deepspeed_config=str(fixed)), 1, False)
    fixed.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(TrainConfig(model_config=str(TINY_VAE), deepspeed_config=str(fixed)), 1, False)


def test_stage_schedule():
    cfg = TrainConfig(model_config=str(TINY_VAE), lr=1.0, min_lr=0.1, warmup_steps=4, stage1_steps=20,
                      stage2_steps=10)
    s = StageSchedule(cfg)
    assert [round(s(i), 3) for i in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert s(4) == pytest.approx(1.0) and s(20) == pytest.approx(0.1) and s(12) < s(5)
    s.stage2_start = 15  # stage 1 ended early: a fresh warm-up + cosine over stage2_steps
    assert s(15) == pytest.approx(0.2) and s(19) == pytest.approx(1.0) and s(25) == pytest.approx(0.1)
    assert StageSchedule(TrainConfig(model_config=str(TINY_VAE), stage1_steps=0)).stage2_start == 0


def test_stage1_plateau_tracker():
    cfg = load_train_config(REPO / "configs/train/tiny.yaml", ["stage1_plateau.patience=2",
                                                                "stage1_plateau.min_rel_improvement=0.1"])
    prog = Progress()
    for v in (1.0, 0.8, 0.75, 0.74):  # 0.75 and 0.74 improve by < 10% on the best
        update_plateau(prog, v, cfg)
    assert (prog.best, prog.bad) == (0.74, 2)
    update_plateau(prog, 0.5, cfg)
    assert (prog.best, prog.bad) == (0.5, 0)
    assert prog.end_step(cfg) == 60 and prog.stage() == 1
    prog.step, prog.stage2_start = 30, 30  # stage 1 ended early at step 30
    assert prog.end_step(cfg) == 50 and prog.stage() == 2 and prog.stage(29) == 1


# ---- data ---------------------------------------------------------------------------------------
def test_holdout_never_trained_on(corpora):
    c = Corpus(corpora["corpus"])
    held = choose_holdout(c, 0.1, seed=0)
    blocks = {t["block"] for ti, t in enumerate(c.tensors) for (si, st, *_) in t["locations"] if (ti, st) in held}
    assert blocks == {"attn", "mlp"} and held == choose_holdout(c, 0.1, seed=0) != choose_holdout(c, 0.1, seed=1)
    assert choose_holdout(c, 0.0, seed=0) == set()
    starts = {(ti, st): n for ti, t in enumerate(c.tensors) for (si, st, n, *_) in t["locations"]}
    held_samples = {(ti, st + i) for (ti, st) in held for i in range(starts[(ti, st)])}
    for backend in ("indexed", "webdataset"):
        stream = TrainStream(c, 16, exclude=held, seed=0, shuffle_buffer=64, backend=backend)
        seen = set()
        for i, b in enumerate(make_loader(stream)):
            seen |= set(zip(b["tensor"].tolist(), b["sample"].tolist()))
            if i == 40:
                break
        assert not seen & held_samples and len(seen) > 100
    ev = load_eval_set(c, sorted(held), 1000, 0)
    assert len(ev) == len(held_samples) and ev.x.shape[1:] == (8, 64)
    capped = load_eval_set(c, None, 50, 0)
    assert len(capped) == 50 and set(capped.block.tolist()) == {0, 1}
    a, b = capped.shard(0, 3), capped.shard(1, 3)
    assert len(a) == len(b) == 16 and not torch.equal(a.x, b.x)
    # a few samples from each of many blocks: memory is the samples taken (+ one block), not every
    # block they came from (views kept whole blocks alive: 3.7 GB for 8192 samples at 3B)
    import tracemalloc

    keys = [(ti, st) for ti, st, _n, _b in blocks_of(c)]
    block_bytes = max(n for *_, n, _b in blocks_of(c)) * 8 * 64 * 4
    tracemalloc.start()
    one_each = load_eval_set(c, keys, len(keys), 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    taken = len(one_each) * 8 * 64 * 4
    assert len(one_each) == len(keys) > 8 and peak < 2 * taken + 4 * block_bytes, (peak, taken, block_bytes)


# ---- fail fast ----------------------------------------------------------------------------------
def tiny_cfg(corpora, tmp_path, **kw) -> TrainConfig:
    return load_train_config(REPO / "configs/train/tiny.yaml",
                             [f"corpus={corpora['corpus']}", f"run_dir={tmp_path / 'run'}",
                              *[f"{k}={v}" for k, v in kw.items()]])


def test_bad_inputs_fail_before_training(corpora, tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        run_train(tiny_cfg(corpora, tmp_path, corpus=tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"model.chunk=32 .* chunk=64"):
        run_train(tiny_cfg(corpora, tmp_path, **{"model.chunk": 32}))
    with pytest.raises(ConfigError, match=r"model.tokens=4 .* tokens=8"):
        run_train(tiny_cfg(corpora, tmp_path, **{"model.tokens": 4, "model.token_stride": 1}))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in corpora["corpus"].iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(broken.glob("shard-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CorpusError, match="truncated"):
        run_train(tiny_cfg(corpora, tmp_path, corpus=broken))
    with pytest.raises(ConfigError, match="val_fraction"):
        run_train(tiny_cfg(corpora, tmp_path, val_fraction=0.0, **{"stage1_plateau.patience": 2}))
    assert "RANK" not in os.environ  # nothing touched the environment before failing


def fake_checkpoint(run_dir: Path, step: int, cfg: TrainConfig, world: int = 2, complete=True,
                    suffix="") -> Path:
    p = ck.step_dir(run_dir, step)
    p = p.with_name(p.name + suffix)
    p.mkdir(parents=True)
    (p / ck.STATE).write_text(json.dumps({"format": ck.STATE_FORMAT, "step": step, "world_size": world,
                                          "model_digest": cfg.model_digest(), "model": {}}))
    if complete:
        (p / ck.COMPLETE).write_text("")
    return p


def test_resume_picks_complete_and_refuses_other_config(corpora, tmp_path):
    cfg = tiny_cfg(corpora, tmp_path)
    run = Path(cfg.run_dir)
    assert ck.find_resume(run, "auto") is None
    good = fake_checkpoint(run, 5, cfg)
    fake_checkpoint(run, 8, cfg, complete=False)  # killed before the marker
    fake_checkpoint(run, 9, cfg, suffix=".tmp")  # killed before the rename (even with a marker)
    assert ck.find_resume(run, "auto") == good and [s for s, _ in list_checkpoints(run)] == [5]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ck.find_resume(run, str(ck.step_dir(run, 8)))
    assert ck.find_resume(run, "none") is None
    other = tiny_cfg(corpora, tmp_path, **{"model.latent_dim": 16})
    with pytest.raises(CheckpointError, match="another model configuration"):
        run_train(other)
    with pytest.raises(CheckpointError, match="written by 2 ranks, this run has 1"):
        run_train(cfg)


# ---- real runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero2_run(corpora, tmp_path_factory):
    """Reference run: accelerate launch, 2 processes, ZeRO-2."""
    run = tmp_path_factory.mktemp("zero2") / "run"
    t0 = time.time()
    rc, out = launch("accelerate", [*RUN, f"corpus={corpora['corpus']}", f"heldout_corpus={corpora['heldout']}",
                                    f"run_dir={run}"], run.parent / "out.txt")
    assert rc == 0, out[-4000:]
    print(f"zero2 accelerate run: {time.time() - t0:.1f}s")
    return run


@pytest.mark.slow
def test_accelerate_zero2_trains_logs_and_exports(zero2_run, corpora):
    run = zero2_run
    assert_falls(run, 24, 16)
    assert [s for s, _ in list_checkpoints(run)] == [32, 40]  # keep_last_k=2
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert (run / "logs" / "rank0.log").is_file() and (run / "logs" / "rank1.log").is_file()
    assert "rank 1/2" in (run / "logs" / "rank1.log").read_text()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["chunk"] == 64 and resolved["stage1_steps"] == 24
    state = ck.read_state(run / "checkpoints" / "step-00000040")
    assert (state["step"], state["stage"], state["stage2_start"], state["world_size"]) == (40, 2, 24, 2)
    assert state["data"]["batches_consumed"] == 40

    # TensorBoard (rank 0 only) holds every listed scalar
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert tags >= TB_TAGS, TB_TAGS - tags
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 41))
    assert [e.value for e in ea.Scalars("train/stage")][-1] == 2.0
    losses = train_losses(run)
    assert ea.Scalars("train/loss")[9].value == pytest.approx(losses[10], rel=1e-6)

    # the exported plain checkpoint loads without DeepSpeed and reproduces the logged val error
    vae = load_vae(run / "vae")
    final = read_metrics(run, "val")[-1]
    assert final["step"] == 40
    c = Corpus(corpora["corpus"])
    ev = load_eval_set(c, sorted(choose_holdout(c, 0.1, 0)), 128, 0)
    n = len(ev) // 2 * 2
    with torch.no_grad():
        x_hat = vae(ev.x[:n], sample=False)["x_hat"]
    assert torch.mean((x_hat - ev.x[:n]) ** 2).item() == pytest.approx(final["val/recon"], rel=1e-4)
    assert final["val/recon"] < 0.8 and final["heldout/recon"] < 0.9
    # export again from a given checkpoint, to another directory: `lsm train export`
    from lsm_dist.cli import main as lsm

    again = run.parent / "vae2"
    assert lsm(["train", "export", str(run), "--checkpoint", str(run / "checkpoints" / "step-00000040"),
                "--out", str(again)]) == 0
    a, b = vae.state_dict(), load_vae(again).state_dict()  # (header order varies per process)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert export_vae(run) == run / "vae"  # default: newest complete checkpoint, RUN_DIR/vae


@pytest.mark.slow
def test_accelerate_zero3_trains_and_exports(corpora, tmp_path):
    run = tmp_path / "run"
    rc, out = launch("accelerate", [*RUN, f"corpus={corpora['corpus']}", f"run_dir={run}", "stage1_steps=16",
                                    "stage2_steps=12", "val_every=0", "ckpt_every=0"],
                     tmp_path / "out.txt", accelerate_cfg="zero3_cpu_2proc")
    assert rc == 0, out[-4000:]
    assert "ZeRO-3" in (run / "logs" / "rank0.log").read_text()
    assert_falls(run, 16, 12)
    vae = load_vae(run / "vae")
    x = load_eval_set(Corpus(corpora["corpus"]), None, 32, 0).x
    with torch.no_grad():
        assert torch.isfinite(vae(x, sample=False)["x_hat"]).all()


@pytest.mark.slow
def test_kill_and_resume_continues_exactly(zero2_run, corpora, tmp_path):
    """torchrun (2 ranks, ZeRO-2) killed with SIGKILL after a checkpoint; resume=auto must
    reproduce the uninterrupted accelerate run's losses step for step."""
    run = tmp_path / "run"
    args = [*RUN, f"corpus={corpora['corpus']}", f"heldout_corpus={corpora['heldout']}", f"run_dir={run}"]
    p = launch("torchrun", args, tmp_path / "out1.txt", wait=False)
    marker = run / "checkpoints" / "step-00000016" / ck.COMPLETE
    deadline = time.time() + 240
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), (tmp_path / "out1.txt").read_text()[-3000:]
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and both ranks (their own session)
    p.wait()
    assert not (run / "vae").exists()
    fake = run / "checkpoints" / "step-00000099.tmp"  # a save cut off by the kill
    fake.mkdir()
    (fake / ck.COMPLETE).write_text("")

    rc, out = launch("torchrun", args, tmp_path / "out2.txt")
    assert rc == 0, out[-4000:]
    log = (run / "logs" / "rank0.log").read_text()
    resumed = [int(x.split("at step ")[1].split()[0]) for x in log.splitlines() if "resumed from" in x]
    assert len(resumed) == 1 and resumed[0] >= 16, resumed
    ref, got = train_losses(zero2_run), train_losses(run)
    assert sorted(got) == list(range(1, 41))
    for s in range(1, 41):
        assert got[s] == pytest.approx(ref[s], abs=1e-6, rel=0), (s, got[s], ref[s])
    ref_val, got_val = read_metrics(zero2_run, "val"), read_metrics(run, "val")
    assert [r["step"] for r in got_val] == [r["step"] for r in ref_val] == [8, 16, 24, 32, 40]
    assert [r["val/recon"] for r in got_val] == pytest.approx([r["val/recon"] for r in ref_val], abs=1e-6)
    assert (run / "vae" / "model.safetensors").is_file()


@pytest.mark.slow
def test_nan_stops_keeps_last_checkpoint_and_resumes(corpora, tmp_path):
    """Single process: a NaN at step 7 stops with a message naming the step; the step-5
    checkpoint stays the newest and a plain re-run resumes from it to the end."""
    run = tmp_path / "run"
    args = ["--config", "configs/train/tiny.yaml", f"corpus={corpora['corpus']}", f"run_dir={run}",
            "stage1_steps=8", "stage2_steps=2", "ckpt_every=5", "val_every=0", "export=false"]
    rc, out = launch("python", [*args, "debug_nan_at_step=7"], tmp_path / "out1.txt")
    assert rc == 1, out[-3000:]
    assert "NaN/Inf at step 7" in out and "no checkpoint was written" in out
    assert [s for s, _ in list_checkpoints(run)] == [5]
    assert not list((run / "checkpoints").glob("step-00000007*"))
    assert max(r["step"] for r in read_metrics(run, "train")) <= 5
    rc, out = launch("python", args, tmp_path / "out2.txt")
    assert rc == 0, out[-3000:]
    assert "resumed from" in out and "step-00000005" in out
    assert [s for s, _ in list_checkpoints(run)] == [5, 10]
    assert max(train_losses(run)) == 10


def test_format_2_corpus_trains_like_format_1_of_the_same_weights(corpora, tmp_path):
    """The same weights (a bf16 and an fp32 model) as a format-2 corpus (their own values,
    standardized by the loader threads) and a format-1 one (standardized float32 + fixups):
    identical batches, so training gives the same loss curve and validation losses."""
    d = corpora["root"]
    bf16 = write_checkpoint(tmp_path / "bf16", {k: v.to(torch.bfloat16) for k, v in structured(2, 5).items()})
    models = [str(bf16), str(d / "m1")]
    kw = dict(tokens=8, chunk=64, block_samples=8, shard_samples=32)
    for v in (1, 2):
        run_convert(ConvertConfig(models=models, out_dir=str(tmp_path / f"v{v}"), format_version=v, **kw),
                    progress=False)
    runs = {}
    for v in (1, 2):
        runs[v] = tmp_path / f"run{v}"
        run_train(tiny_cfg(corpora, tmp_path, corpus=tmp_path / f"v{v}", run_dir=runs[v], stage1_steps=10,
                           stage2_steps=4, log_every=1, val_every=7, ckpt_every=0, num_workers=2, loader="thread"))
    l1, l2 = train_losses(runs[1]), train_losses(runs[2])
    assert sorted(l1) == sorted(l2) == list(range(1, 15))
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-6, abs=1e-9), step  # float32 rounding at most
    v1 = {r["step"]: r["val/recon"] for r in read_metrics(runs[1], "val")}
    v2 = {r["step"]: r["val/recon"] for r in read_metrics(runs[2], "val")}
    assert v1 and v1.keys() == v2.keys() and all(v2[s] == pytest.approx(v1[s], rel=1e-6) for s in v1)


@pytest.mark.parametrize("lr_scale", [0.0, 0.1])
def test_linear_skip_starts_as_pca_and_trains_at_its_own_lr(corpora, tmp_path, lr_scale):
    """skip=sample: the trainer fits the linear path's PCA init on training samples (every rank
    the same), and the path trains at skip_lr_scale × lr through the DeepSpeed optimizer: frozen
    (scale 0) it ends exactly at the init; at 0.1 it moves, but less than the transformer."""
    cfg = tiny_cfg(corpora, tmp_path, **{"model.skip": "sample", "skip_lr_scale": lr_scale,
                                         "stage1_steps": 12, "stage2_steps": 4, "val_every": 0,
                                         "ckpt_every": 0, "num_workers": 2, "loader": "thread"})
    metrics = run_train(cfg)
    log = (Path(cfg.run_dir) / "logs" / "rank0.log").read_text()
    m = re.search(r"PCA code of (\d+) training samples \(keeps ([\d.]+)% of their energy\)", log)
    assert m, log
    corpus = Corpus(cfg.corpus)
    holdout = choose_holdout(corpus, cfg.val_fraction, cfg.seed)
    keys = [(t, s) for t, s, _n, _b in blocks_of(corpus) if (t, s) not in holdout]
    init = TransformerVAE(cfg.model)
    kept = init.init_skip_pca(load_eval_set(corpus, keys, cfg.skip_init_samples, cfg.seed).x)
    assert int(m.group(1)) <= cfg.skip_init_samples and float(m.group(2)) == pytest.approx(100 * kept, abs=0.05)
    vae = load_vae(metrics["vae"])
    moved = (vae.skip_enc.weight - init.skip_enc.weight).norm() / init.skip_enc.weight.norm()
    if lr_scale == 0:
        assert torch.equal(vae.skip_enc.weight, init.skip_enc.weight)
        assert torch.equal(vae.skip_dec.weight, init.skip_dec.weight)
    else:
        assert 0 < moved < 0.2, moved
    assert vae.head.weight.abs().sum() > 0  # the transformer (zero-initialized head) trained


@pytest.mark.slow
def test_zero3_two_ranks_share_the_pca_start_and_keep_a_frozen_skip(corpora, tmp_path):
    """2 gloo ranks under ZeRO-3 (parameters partitioned after the init) with 2 loader threads
    each: both ranks fit the same PCA start, and skip_lr_scale=0 survives DeepSpeed's optimizer
    wrapping (the exported skip weights are exactly the init)."""
    run = tmp_path / "run"
    rc, out = launch("accelerate", [*RUN, f"corpus={corpora['corpus']}", f"run_dir={run}", "stage1_steps=12",
                                    "stage2_steps=4", "val_every=0", "ckpt_every=0", "model.skip=sample",
                                    "skip_lr_scale=0.0", "num_workers=2", "loader=thread"],
                     tmp_path / "out.txt", accelerate_cfg="zero3_cpu_2proc")
    assert rc == 0, out[-4000:]
    fits = [re.search(r"PCA code of .*energy\)", (run / "logs" / f"rank{r}.log").read_text()) for r in (0, 1)]
    assert all(fits) and fits[0].group(0) == fits[1].group(0)
    cfg = load_train_config(REPO / "configs/train/tiny.yaml",
                            [f"corpus={corpora['corpus']}", f"run_dir={run}", "model.skip=sample"])
    corpus = Corpus(cfg.corpus)
    holdout = choose_holdout(corpus, cfg.val_fraction, cfg.seed)
    keys = [(t, s) for t, s, _n, _b in blocks_of(corpus) if (t, s) not in holdout]
    init = TransformerVAE(cfg.model)
    init.init_skip_pca(load_eval_set(corpus, keys, cfg.skip_init_samples, cfg.seed).x)
    vae = load_vae(run / "vae")
    assert torch.equal(vae.skip_enc.weight, init.skip_enc.weight)
    assert torch.equal(vae.skip_dec.weight, init.skip_dec.weight)
    assert vae.head.weight.detach().abs().sum() > 0
