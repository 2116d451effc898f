"""The whole chain at the scale the project is for, measured stage by stage.

    python benchmarks/bench_scale.py --shape llama-3b                     # every stage
    python benchmarks/bench_scale.py --shape qwen2-7b --stages generate convert weight
    python benchmarks/bench_scale.py --shape llama-1b --stages generate weight --methods linear ties dare_ties
    python benchmarks/bench_scale.py --shape toy                          # CI: the same code at a toy shape

1. **generate**: a checkpoint pair with the exact tensor names and shapes of the architecture
   (Llama-3.2-3B: 28 layers, hidden 3072, MLP 8192, 24 / 8 heads, vocab 128256, tied; Qwen2-7B:
   28 layers, hidden 3584, MLP 18944, 28 / 4 heads, q/k/v biases, vocab 152064), bf16 sharded
   safetensors + index + config.json, written shard by shard (never the whole model in memory).
   Values: seeded Gaussians with SmolLM2-135M-Instruct's per-role mean / std (the real model's
   statistics, measured from its checkpoint when it is at hand -- ``runs/zoo-real`` -- else the
   table below, measured from it on 2026-12-06), the std scaled by √(fan_in_SmolLM2 / fan_in).
   Model B = model A + a seeded perturbation of 0.6 % of each tensor's norm (the size of the
   project's LoRA experts' task vectors).
2. **convert** model A (``lsm convert``, 2 workers), **train** the demo VAE for a fixed number of
   steps on 2 ranks (ZeRO-3), and the paper-size VAE (``configs/vae/paper-175m.yaml``) for a few
   steps on 1 and on 2 ZeRO-3 ranks (per-rank memory), **merge** the pair in latent space through
   ``slurm/submit_merge.sh 2`` on the local Slurm (two array tasks: the time of the slowest vs
   the mean), **encode_decode** model A alone (its VAE reconstruction: the latent stages for one
   model, half a pair's disk), **forward** (transformers loads the latent result and runs one
   forward pass), **weight**: the same mergekit config (``--methods``: linear / ties / ties_spread / dare_ties) through
   ``lsm merge CONFIG OUT`` and through ``mergekit-yaml CONFIG OUT`` back to back, the outputs
   compared tensor by tensor.
3. Per stage: wall time, samples/s (and per core), the peak RSS of every process of the stage
   (psutil, sampled every 50 ms over the process tree -- Slurm jobs: every process running the
   plan), bytes read and written (``/proc/<pid>/io`` of the tree), the disk high-water of the
   work directory, and for array stages the slowest vs the mean task. Written as JSON
   (``OUT/bench_scale.json``) and one line per stage.

The targets (issue: scale) are checked in ``report()``: peak RSS of every process ≤ 2 × the
largest tensor in float32 + the VAE and its optimizer + 1.5 GB; slowest array task ≤ 1.25 × the
mean; weight-space merges ≤ 1.0× mergekit's time at ≤ 0.5× its peak memory; ZeRO-3 per-rank model state
≈ ½ of one rank's.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "toy": dict(family="llama", layers=2, hidden=64, inter=160, heads=4, kv=2, vocab=256, tied=False, bias=False),
    "llama-1b": dict(family="llama", layers=16, hidden=2048, inter=8192, heads=32, kv=8, vocab=128256, tied=True,
                     bias=False),
    "llama-3b": dict(family="llama", layers=28, hidden=3072, inter=8192, heads=24, kv=8, vocab=128256, tied=True,
                     bias=False),
    "qwen2-7b": dict(family="qwen2", layers=28, hidden=3584, inter=18944, heads=28, kv=4, vocab=152064, tied=False,
                     bias=True),
}
STAGES = ("generate", "convert", "train", "train_paper", "merge", "encode_decode", "forward", "weight")
# SmolLM2-135M-Instruct (hidden 576), per role: (mean, std), averaged over its layers
# (measured from runs/zoo-real/smollm2-135m, 2026-12-06; recomputed by role_stats() when present)
SMOLLM2 = {"q_proj": (0.0, 0.2001), "k_proj": (0.0, 0.2056), "v_proj": (0.0, 0.1892), "o_proj": (0.0, 0.1751),
           "gate_proj": (-0.0002, 0.1876), "up_proj": (0.0, 0.1990), "down_proj": (0.0, 0.1919),
           "embed": (-0.0005, 0.1356), "input_layernorm": (0.3015, 0.0847),
           "post_attention_layernorm": (0.2336, 0.0558), "final_norm": (1.8027, 0.2948), "bias": (0.0, 0.02)}
SMOLLM2_FAN_IN = 576
PERTURB = 0.006  # model B: A + noise of this fraction of each tensor's norm


# ----------------------------------------------------------------------------- the pair
def role_stats() -> dict[str, tuple[float, float]]:
    """SmolLM2's per-role (mean, std) from its checkpoint when it is at hand, else the table."""
    src = REPO / "runs" / "zoo-real" / "smollm2-135m"
    if not (src / "config.json").is_file():
        return dict(SMOLLM2)
    from lsm_dist.checkpoint import Checkpoint

    acc: dict[str, list[tuple[float, float]]] = {}
    with Checkpoint(src) as ck:
        for n, t in ck.tensors.items():
            x = ck.read(n).float()
            key = t.role or n.split(".")[-2]
            acc.setdefault(key, []).append((x.mean().item(), x.std().item()))
    out = dict(SMOLLM2)
    out |= {k: (sum(m for m, _ in v) / len(v), sum(s for _, s in v) / len(v)) for k, v in acc.items()}
    return out


def tensor_specs(shape: dict) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, role, fan_in) of every tensor of the architecture, in checkpoint order."""
    h, m, hd = shape["hidden"], shape["inter"], shape["hidden"] // shape["heads"]
    kv = shape["kv"] * hd
    out = [("model.embed_tokens.weight", (shape["vocab"], h), "embed", SMOLLM2_FAN_IN)]
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        for name, s, role, fan in [("self_attn.q_proj", (h, h), "q_proj", h), ("self_attn.k_proj", (kv, h), "k_proj", h),
                                   ("self_attn.v_proj", (kv, h), "v_proj", h), ("self_attn.o_proj", (h, h), "o_proj", h),
                                   ("mlp.gate_proj", (m, h), "gate_proj", h), ("mlp.up_proj", (m, h), "up_proj", h),
                                   ("mlp.down_proj", (h, m), "down_proj", m)]:
            out.append((p + name + ".weight", s, role, fan))
            if shape["bias"] and role in ("q_proj", "k_proj", "v_proj"):
                out.append((p + name + ".bias", (s[0],), "bias", SMOLLM2_FAN_IN))
        out += [(p + "input_layernorm.weight", (h,), "input_layernorm", SMOLLM2_FAN_IN),
                (p + "post_attention_layernorm.weight", (h,), "post_attention_layernorm", SMOLLM2_FAN_IN)]
    out.append(("model.norm.weight", (h,), "final_norm", SMOLLM2_FAN_IN))
    if not shape["tied"]:
        out.append(("lm_head.weight", (shape["vocab"], h), "embed", SMOLLM2_FAN_IN))
    return out


def _seed(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def make_tensor(name: str, s: tuple[int, ...], role: str, fan_in: int, stats: dict, seed: int,
                perturb: float = 0.0) -> torch.Tensor:
    """One tensor of model A (``perturb`` 0) or B (A + noise of ``perturb`` × its norm), bf16."""
    mean, std = stats[role]
    if role not in ("input_layernorm", "post_attention_layernorm", "final_norm", "embed", "bias"):
        std = std * math.sqrt(SMOLLM2_FAN_IN / fan_in)
    g = torch.Generator().manual_seed(_seed(seed, name))
    x = torch.randn(*s, generator=g) * std + mean
    if perturb:
        gp = torch.Generator().manual_seed(_seed(seed, name, "perturb"))
        x = x + torch.randn(*s, generator=gp) * (perturb * float(x.norm()) / math.sqrt(x.numel()))
    return x.to(torch.bfloat16)


def write_model(out: Path, shape: dict, stats: dict, seed: int, perturb: float, shard_gb: float = 2.0) -> int:
    """Sharded bf16 safetensors + index + config.json, shard by shard; returns the bytes written."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(shape)
    shards, cur, size = [], [], 0
    for spec in specs:
        nb = math.prod(spec[1]) * 2
        if cur and size + nb > shard_gb * 1e9:
            shards.append(cur)
            cur, size = [], 0
        cur.append(spec)
        size += nb
    shards.append(cur)
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: make_tensor(n, s, r, f, stats, seed, perturb) for n, s, r, f in part}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += (out / fname).stat().st_size
        weight_map |= {n: fname for n in tensors}
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    cfg = {"architectures": ["LlamaForCausalLM" if shape["family"] == "llama" else "Qwen2ForCausalLM"],
           "model_type": shape["family"], "hidden_size": shape["hidden"], "intermediate_size": shape["inter"],
           "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
           "num_key_value_heads": shape["kv"], "head_dim": shape["hidden"] // shape["heads"],
           "vocab_size": shape["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": shape["tied"], "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return total


# ----------------------------------------------------------------------------- measuring
def dir_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (what the stage's work directory holds)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):  # a file removed meanwhile
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


class Monitor:
    """Samples a set of processes every 50 ms: per-process peak RSS, io bytes; and the disk
    high-water of the work directory (the bytes of its files, every 0.5 s)."""

    def __init__(self, root: Path, match=None):
        import psutil

        self.psutil, self.root, self.match = psutil, root, match
        self.peak: dict[int, tuple[float, str]] = {}
        self.io: dict[int, tuple[int, int]] = {}
        self.bytes0 = self.high = dir_bytes(root)
        self.stop = threading.Event()
        self.pids: set[int] = set()
        self.matched: list = []
        self.t = threading.Thread(target=self._run, daemon=True)

    def watch(self, pid: int) -> None:
        self.pids.add(pid)

    def _procs(self, rescan: bool):
        out = []
        for pid in list(self.pids):
            try:
                p = self.psutil.Process(pid)
                out += [p, *p.children(recursive=True)]
            except self.psutil.Error:
                pass
        if self.match is not None:
            if rescan:  # the whole process table once a second (every 50 ms it cost ~20 % of a core)
                self.matched = []
                for p in self.psutil.process_iter(["cmdline"]):
                    try:
                        if self.match(" ".join(p.info["cmdline"] or [])):
                            self.matched += [p, *p.children(recursive=True)]
                    except self.psutil.Error:
                        pass
            out += [p for p in self.matched if p.is_running()]
        return out

    def _run(self) -> None:
        tick = 0
        while not self.stop.is_set():
            if tick % 10 == 0:  # the work directory's size, every 0.5 s
                self.high = max(self.high, dir_bytes(self.root))
            for p in self._procs(rescan=tick % 20 == 0):
                try:
                    rss = p.memory_info().rss / 2**20
                    if rss > self.peak.get(p.pid, (0, ""))[0]:
                        self.peak[p.pid] = (rss, " ".join(p.cmdline()[:4])[:120])
                    io = p.io_counters()
                    self.io[p.pid] = (io.read_bytes, io.write_bytes)
                except (self.psutil.Error, OSError):
                    pass
            tick += 1
            time.sleep(0.05)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()

    def summary(self) -> dict:
        return {"peak_rss_mib": max((v[0] for v in self.peak.values()), default=0.0),
                "processes": sorted(({"rss_mib": round(r, 1), "cmd": c} for r, c in self.peak.values()),
                                    key=lambda d: -d["rss_mib"])[:8],
                "read_bytes": sum(r for r, _ in self.io.values()), "write_bytes": sum(w for _, w in self.io.values()),
                "disk_high_water_bytes": self.high, "disk_growth_bytes": max(0, self.high - self.bytes0)}


def run(cmd: list[str], root: Path, env: dict | None = None, match=None, cwd: Path = REPO) -> dict:
    """Run a command under a :class:`Monitor`; raise with its output's tail on failure."""
    t0 = time.perf_counter()
    with Monitor(root, match) as mon:
        p = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        mon.watch(p.pid)
        out, _ = p.communicate()
    res = {"wall_s": round(time.perf_counter() - t0, 2), **mon.summary()}
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed ({p.returncode}):\n{out[-3000:]}")
    res["output_tail"] = out[-400:]
    return res


# ----------------------------------------------------------------------------- stages
def lsm(*args) -> list[str]:
    return [str(Path(sys.executable).parent / "lsm"), *args]


def stage_generate(a, w: Path, res: dict) -> None:
    stats = role_stats()
    t0 = time.perf_counter()
    for name, perturb in (("A", 0.0), ("B", PERTURB)):
        if not (w / name / "config.json").is_file():
            write_model(w / name, a.shape, stats, seed=0, perturb=perturb)
    nbytes = sum(f.stat().st_size for f in (w / "A").glob("*.safetensors"))
    res["generate"] = {"wall_s": round(time.perf_counter() - t0, 1), "bytes_per_model": nbytes,
                       "tensors": len(tensor_specs(a.shape)), "stats_from": "SmolLM2-135M-Instruct per role"}


def stage_convert(a, w: Path, res: dict) -> None:
    shutil.rmtree(w / "corpus", ignore_errors=True)
    r = run(lsm("convert", f"models=[{w / 'A'}]", f"out_dir={w / 'corpus'}", "tokens=8", "chunk=64",
                "num_workers=2", "overwrite=true"), w)
    from lsm_dist.corpus.reader import Corpus

    n = Corpus(w / "corpus").num_samples
    res["convert"] = r | {"samples": n, "samples_per_s": n / r["wall_s"], "samples_per_s_per_core": n / r["wall_s"] / 2}


def stage_train(a, w: Path, res: dict) -> None:
    run_dir = w / "vae_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    port = 29000 + os.getpid() % 1000
    common = ["--config", "configs/train/tiny.yaml", f"model_config={REPO / 'configs/vae/demo.yaml'}",
              f"corpus={w / 'corpus'}", f"stage1_steps={a.train_steps}", "stage2_steps=0", "val_every=0",
              f"ckpt_every={a.train_steps}", "zero_stage=3", "cpu_threads=1", "log_every=10"]
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
             "-m", "lsm_dist.train", *common, f"run_dir={run_dir}"], w, env={"OMP_NUM_THREADS": "1"})
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sps = [x["perf/samples_per_s"] for x in recs if x.get("kind") == "train"][1:]
    res["train"] = r | {"steps": a.train_steps, "ranks": 2, "zero_stage": 3,
                        "samples_per_s": sum(sps) / max(len(sps), 1), "vae": str(run_dir / "vae")}


def stage_train_paper(a, w: Path, res: dict) -> None:
    """The paper-size VAE for a few steps, ZeRO-3 on 1 and on 2 ranks: per-rank peak RSS."""
    out = {}
    from lsm_dist.config import load_config
    from lsm_dist.model import TransformerVAE, VAEConfig

    vcfg = load_config(VAEConfig, REPO / a.paper_vae)
    corpus = w / f"corpus-paper-{vcfg.tokens}x{vcfg.chunk}"
    if not (corpus / "manifest.json").is_file():  # the first layer's tensors suffice for a few steps
        run(lsm("convert", f"models=[{w / 'A'}]", f"out_dir={corpus}", f"tokens={vcfg.tokens}", f"chunk={vcfg.chunk}",
                "num_workers=2", "overwrite=true", "include=layers\\.0\\.", "block_samples=16"), w)
    for ranks in (1, 2):
        run_dir = w / f"paper-{ranks}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = ["-m", "lsm_dist.train", "--config", "configs/train/paper.yaml",
               f"model_config={REPO / a.paper_vae}", f"corpus={corpus}", f"stage1_steps={a.paper_steps}",
               "stage2_steps=0", "val_every=0", "ckpt_every=0", "export=false", "zero_stage=3", "batch_size=4",
               "precision=fp32", "cpu_threads=1", "log_every=1", "verify_corpus=false", "num_workers=0",
               f"run_dir={run_dir}"]
        full = [sys.executable, *cmd] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29500 + os.getpid() % 1000), *cmd]
        r = run(full, w, env={"OMP_NUM_THREADS": "1"})
        ranks_rss = [p["rss_mib"] for p in r["processes"] if "lsm_dist.train" in p["cmd"]]
        out[f"{ranks}_rank"] = r | {"per_rank_peak_rss_mib": sorted(ranks_rss, reverse=True)[:ranks]}
    params = sum(p.numel() for p in TransformerVAE(vcfg).parameters())
    one = out["1_rank"]["per_rank_peak_rss_mib"][0]
    two = max(out["2_rank"]["per_rank_peak_rss_mib"] or [float("nan")])
    out["model_state_mib"] = params * 16 / 2**20  # fp32 weights + grads + two Adam moments
    out["per_rank_saving_mib"] = one - two
    out["saving_vs_half_state"] = (one - two) / (out["model_state_mib"] / 2)
    res["train_paper"] = out


def stage_merge(a, w: Path, res: dict) -> None:
    """Latent merge of the pair (lerp, delta decoding) through slurm/submit_merge.sh 2 on the local Slurm."""
    _latent_plan(a, w, res, "merge", {"models": {"A": str(w / "A"), "B": str(w / "B")}, "method": "lerp",
                                      "params": {"lambda": 0.5}, "decode": "delta"})


def stage_encode_decode(a, w: Path, res: dict) -> None:
    """Model A alone encoded and decoded (its VAE reconstruction, W = D(z_A)) through
    slurm/submit_merge.sh 2: the latent stages' cost for one model, half the disk of a pair."""
    _latent_plan(a, w, res, "encode_decode", {"models": {"A": str(w / "A")}, "method": "passthrough",
                                              "decode": "direct"})


def _latent_plan(a, w: Path, res: dict, key: str, fields: dict) -> None:
    """Run a latent-space plan on model A (target) through ``slurm/submit_merge.sh 2``; record
    the wall time, every process's peak RSS, the disk high-water against latents + output (+ one layer file), and
    per array stage the slowest vs the mean task and the parameters per second."""
    vae = Path(res.get("train", {}).get("vae") or w / "vae_run" / "vae")
    out, cache, logs = w / key, w / "latent_cache", w / f"slurm-logs-{key}"
    for d in (out, cache, logs):  # this benchmark's own outputs of an earlier run
        shutil.rmtree(d, ignore_errors=True)
    logs.mkdir()
    plan = w / f"{key}.yaml"
    plan.write_text(json.dumps({**fields, "target": "A", "space": "latent", "vae": str(vae), "out_dir": str(out),
                                "cache_dir": str(cache), "keep_layers": False, "latent_dtype": a.latent_dtype}))
    t0 = time.perf_counter()
    with Monitor(w, match=lambda c: str(plan) in c) as mon:
        sub = subprocess.run(["bash", str(REPO / "slurm/submit_merge.sh"), "2", str(plan)], cwd=logs,
                             env={**os.environ, "LSM_REPO": str(REPO)}, capture_output=True, text=True)
        if sub.returncode != 0:
            raise RuntimeError(f"submit_merge.sh failed: {sub.stderr[-2000:]}")
        ids = sub.stdout.split()
        jobs = [ids[i + 1] for i in range(0, len(ids), 2)]
        while subprocess.run(["squeue", "-h", "-j", ",".join(j for j in jobs if j != "-")],
                             capture_output=True, text=True).stdout.strip():
            time.sleep(1)
    wall = time.perf_counter() - t0
    if not (out / "model" / "MERGE_COMPLETE.json").is_file():
        raise RuntimeError(f"the {key} jobs ended without a complete model in {out}; logs in {logs / 'logs'}")
    tasks = _task_times(logs / "logs")
    r = res[key] = {"wall_s": round(wall, 1), **mon.summary(), "jobs": sub.stdout.strip(), "array_tasks": tasks,
                    "latent_dtype": a.latent_dtype, "latent_bytes": dir_bytes(cache), "output_bytes": dir_bytes(out)}
    # parameters that went through the VAE (the embeddings and norms are merged in weight space):
    # the shapes the latent cache records; every model encoded, the target's tensors decoded
    encoded = latent_params(cache)
    r["encoded_params"] = encoded
    for stage, n in (("encode", encoded), ("merge", encoded // len(fields["models"]))):
        ts = [t["seconds"] for t in tasks if t["stage"] == stage]
        if ts:  # the array's wall time is its slowest task's
            r[f"{stage}_s"] = max(ts)
            r[f"{stage}_params_per_s"] = n / max(ts)
            r[f"{stage}_params_per_s_per_task"] = n / max(ts) / len(ts)
            r[f"{stage}_slowest_over_mean"] = max(ts) / (sum(ts) / len(ts))


def latent_params(cache: Path) -> int:
    """Entries of the weight tensors encoded into a latent cache: the shapes its manifests record
    (one per model, written by the encode stage's finalize step)."""
    return sum(math.prod(t["shape"]) for m in cache.glob("*/manifest.json")
               for t in json.loads(m.read_text())["tensors"].values())


def _task_times(logs: Path) -> list[dict]:
    """Stage and duration of every array task, from the start / end stamps slurm/merge.sh writes."""
    out = []
    for f in sorted(logs.glob("lsm-merge-*.out")):
        lines = f.read_text().splitlines()
        if not lines or "array task" not in lines[0] or "array task -/" in lines[0]:
            continue
        stamps = [float(x.split()[1]) for x in lines if x.startswith("lsm-time ")]
        out.append({"log": f.name, "stage": lines[0].split()[1],
                    "seconds": round(stamps[-1] - stamps[0], 2) if len(stamps) >= 2 else math.nan})
    return out


def stage_forward(a, w: Path, res: dict) -> None:
    """transformers loads the latent stage's result (the merge's, else encode_decode's) and runs one
    forward pass."""
    out = next((w / k / "model" for k in ("merge", "encode_decode") if (w / k / "model" / "config.json").is_file()),
               w / "merge" / "model")
    code = ("import sys, time, torch; from lsm_dist.checkpoint import load_causal_lm; t = time.time(); "
            f"m = load_causal_lm({str(out)!r}, torch.bfloat16).eval(); "
            f"x = torch.randint(3, {min(a.shape['vocab'], 1000)}, (1, 16)); y = m(input_ids=x).logits; "
            "print('finite', bool(torch.isfinite(y).all()), 'load+forward', round(time.time() - t, 1))")
    r = run([sys.executable, "-c", code], w)
    res["forward"] = r | {"model": str(out), "finite": "finite True" in r["output_tail"]}


# mergekit configs of the weight-space comparison: model B onto A, bfloat16 (mergekit's own syntax;
# lsm merge reads the same file)
MK_CONFIGS = {
    "linear": lambda A, B: {"merge_method": "linear", "dtype": "bfloat16",
                            "models": [{"model": A, "parameters": {"weight": 0.5}},
                                       {"model": B, "parameters": {"weight": 0.5}}]},
    "ties": lambda A, B: {"merge_method": "ties", "base_model": A, "dtype": "bfloat16",
                          "models": [{"model": B, "parameters": {"density": 0.5, "weight": 1.0}}]},
    "dare_ties": lambda A, B: {"merge_method": "dare_ties", "base_model": A, "dtype": "bfloat16",
                               "models": [{"model": B, "parameters": {"density": 0.5, "weight": 1.0}}]},
}
MK_CONFIGS["ties_spread"] = MK_CONFIGS["ties"]
# lsm overrides on top of the same file: ties_spread = mergekit's ties config with the tie break that
# merges by row blocks (mergekit configs default to tie_break: argsort, mergekit's own selection)
LSM_OVERRIDES = {"ties_spread": ["params.tie_break=spread"]}
RANDOM_METHODS = {"dare_ties"}  # equal in distribution, not bit for bit (different random streams)
OTHER_TIES = {"ties_spread"}  # another choice among entries tied at the threshold: equal elsewhere


def tensor_digests(model: Path) -> dict[str, str]:
    """sha256 of every tensor's dtype, shape and bytes, one tensor in memory at a time."""
    from lsm_dist.checkpoint import Checkpoint

    out = {}
    with Checkpoint(model) as ck:
        for n in ck.tensors:
            t = ck.read(n).contiguous()
            h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            out[n] = h.hexdigest()
    return out


def _same_tensors(x: dict[str, str], y: dict[str, str]) -> dict:
    """Two outputs' tensor digests: same names, and how many tensors differ bit for bit."""
    if sorted(x) != sorted(y):
        return {"same_names": False, "tensors": len(x)}
    return {"same_names": True, "tensors": len(x), "differ": sum(x[n] != y[n] for n in x)}


def drop_page_cache() -> bool:
    """Write dirty pages back and drop the page cache (root only), so the next tool reads its
    inputs from disk as on a machine that has not just read them. False where not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def stage_weight(a, w: Path, res: dict) -> None:
    """Each method of ``a.methods`` through ``lsm merge CONFIG OUT`` and ``mergekit-yaml CONFIG OUT``
    back to back, the same mergekit config file, the same flags; each output hashed tensor by tensor and
    deleted before the other tool runs (disk: the pair + one output), then the digests compared."""
    mk = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    flags = ["--no-write-model-card", "--out-shard-size", "2B"]
    res["weight"] = {}
    for m in a.methods:
        cfg = w / f"{m}-mk.yml"
        cfg.write_text(json.dumps(MK_CONFIGS[m](str(w / "A"), str(w / "B"))))
        outs = {tool: w / f"{m}-{tool}" for tool in ("lsm", "mergekit")}
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
        r, digests = {}, {}
        for tool, cmd in (("lsm", lsm("merge", str(cfg), str(outs["lsm"]), *LSM_OVERRIDES.get(m, []), *flags)),
                          ("mergekit", [mk, str(cfg), str(outs["mergekit"]), *flags])):
            r[f"{tool}_cold"] = a.cold and drop_page_cache()
            r[tool] = run(cmd, w)
            digests[tool] = tensor_digests(outs[tool])
            shutil.rmtree(outs[tool], ignore_errors=True)
        r["time_ratio"] = r["lsm"]["wall_s"] / r["mergekit"]["wall_s"]
        r["peak_rss_ratio"] = r["lsm"]["peak_rss_mib"] / r["mergekit"]["peak_rss_mib"]
        r["compared"] = _same_tensors(digests["lsm"], digests["mergekit"])
        r["bit_equal"] = None if m in RANDOM_METHODS | OTHER_TIES else r["compared"].get("differ") == 0
        res["weight"][m] = r
        print(f"  {m:10s} lsm {r['lsm']['wall_s']:8.1f} s {r['lsm']['peak_rss_mib']:7.0f} MiB | mergekit "
              f"{r['mergekit']['wall_s']:8.1f} s {r['mergekit']['peak_rss_mib']:7.0f} MiB | x{r['time_ratio']:.2f} "
              f"time, x{r['peak_rss_ratio']:.2f} memory, bit-equal {r['bit_equal']}", flush=True)


def largest_group_bytes(shape: dict) -> int:
    """Bytes (bf16) of the largest layer file a merge writes: one per layer, one for the rest."""
    groups: dict[str, int] = {}
    for n, s, _, _ in tensor_specs(shape):
        key = n.split(".")[2] if n.startswith("model.layers.") else "global"
        groups[key] = groups.get(key, 0) + math.prod(s) * 2
    return max(groups.values())


def report(a, res: dict) -> dict:
    """The targets, checked on the figures (None where the stage did not run)."""
    largest = max(math.prod(s) for _, s, _, _ in tensor_specs(a.shape)) * 4 / 2**20
    bound = 2 * largest + 1536 + 200  # + the demo VAE and its optimizer (~0.8M params) and imports
    peaks = {k: v.get("peak_rss_mib") for k, v in res.items() if isinstance(v, dict) and "peak_rss_mib" in v
             and k not in ("train", "train_paper", "generate")}
    peaks |= {f"weight_{m}": r["lsm"]["peak_rss_mib"] for m, r in res.get("weight", {}).items()}
    latent = {k: res[k] for k in ("merge", "encode_decode") if "latent_bytes" in res.get(k, {})}
    return {"largest_tensor_fp32_mib": largest, "rss_bound_mib": bound,
            "rss_within_bound": {k: v <= bound for k, v in peaks.items()},
            "slowest_task_within_1.25x_mean": {f"{key}.{k}": r[f"{k}_slowest_over_mean"] <= 1.25
                                               for key, r in latent.items() for k in ("encode", "merge")
                                               if f"{k}_slowest_over_mean" in r},
            # + one layer file (the assembly frees each once copied; the global one -- embeddings,
            # final norm -- lasts until the end) + 64 MiB: logs, plan, markers
            "disk_growth_le_latents_plus_output": {
                key: r["disk_growth_bytes"] <= r["latent_bytes"] + r["output_bytes"] + largest_group_bytes(a.shape) + 2**26
                for key, r in latent.items()},
            "weight_time_le_mergekit": {m: r["time_ratio"] <= 1.0 for m, r in res.get("weight", {}).items()},
            "weight_rss_le_half_mergekit": {m: r["peak_rss_ratio"] <= 0.5 for m, r in res.get("weight", {}).items()},
            "weight_bit_equal_mergekit": {m: r["bit_equal"] for m, r in res.get("weight", {}).items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="llama-3b")
    ap.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES))
    ap.add_argument("--workdir", default=None, help="default runs/bench_scale/<shape> (the pair is reused)")
    ap.add_argument("--out", default=None, help="where bench_scale.json goes (default: the workdir)")
    ap.add_argument("--methods", nargs="*", choices=MK_CONFIGS, default=["ties"],
                    help="weight stage: the methods run through lsm and mergekit (default ties)")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--paper-steps", type=int, default=None)
    ap.add_argument("--latent-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="merge stage: the latent cache's dtype (bfloat16 halves its disk; default)")
    ap.add_argument("--clean", action="store_true", help="delete the workdir at the end")
    ap.add_argument("--cold", action="store_true",
                    help="weight stage: drop the page cache before each tool's run (root): both read cold inputs")
    args = ap.parse_args()
    toy = args.shape == "toy"
    a = argparse.Namespace(shape=SHAPES[args.shape], methods=args.methods, cold=args.cold,
                           latent_dtype=args.latent_dtype, train_steps=args.train_steps or (10 if toy else 200),
                           paper_steps=args.paper_steps or (2 if toy else 10),
                           paper_vae="configs/vae/tiny.yaml" if toy else "configs/vae/paper-175m.yaml")
    w = Path(args.workdir or REPO / "runs" / "bench_scale" / args.shape).resolve()
    w.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or w)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"shape": args.shape, **a.shape, "machine": {"cores": os.cpu_count(), "torch": torch.__version__,
                 "cpu_capability": torch.backends.cpu.get_cpu_capability()},
                 "date": time.strftime("%Y-%m-%d %H:%M"), "errors": {}}
    for name in STAGES:
        if name not in args.stages:
            continue
        t0 = time.perf_counter()
        try:
            globals()[f"stage_{name}"](a, w, res)
            r = res.get(name, {})
            print(f"{name:12s} {r.get('wall_s', round(time.perf_counter() - t0, 1)):>9} s  peak RSS "
                  f"{r.get('peak_rss_mib', float('nan')):8.0f} MiB  disk high-water "
                  f"{r.get('disk_high_water_bytes', 0) / 2**30:6.2f} GiB", flush=True)
        except Exception as e:  # one stage's failure must not lose the others' figures
            res["errors"][name] = f"{type(e).__name__}: {e}"[:3000]
            print(f"{name:12s} FAILED: {type(e).__name__}: {str(e)[:500]}", file=sys.stderr, flush=True)
        res["targets"] = report(a, res)
        (out / "bench_scale.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res["targets"], indent=1, default=str))
    if args.clean:
        shutil.rmtree(w, ignore_errors=True)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
