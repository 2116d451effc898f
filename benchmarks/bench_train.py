"""Trainer throughput.

CPU: samples/s of the tiny config (configs/train/tiny.yaml) through the trainer with 1 and 2
gloo processes (DeepSpeed ZeRO-2), and the scaling ratio.

GPU (skipped without CUDA): the paper-size VAE (--vae-config, default configs/vae/paper-175m.yaml:
Table 10 with 12+12 blocks, 175M parameters) in bf16 through the
trainer (DeepSpeed ZeRO-2, all visible GPUs) vs a plain fp32 eager PyTorch loop (AdamW) over the
same model in the same run: samples/s, MFU (vs the bf16 dense peak) and ratios.

    .venv/bin/python benchmarks/bench_train.py [--steps 200] [--cpu-only | --gpu-only]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsm_dist.corpus import ConvertConfig, run_convert  # noqa: E402
from tests.helpers import llama_tensors, write_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_corpus(root: Path, tokens: int, chunk: int, hidden: int, inter: int, layers: int) -> Path:
    out = root / f"corpus-{tokens}x{chunk}"
    if (out / "manifest.json").is_file():
        return out
    models = [write_checkpoint(root / f"ck{s}-{hidden}", llama_tensors(layers=layers, hidden=hidden, inter=inter,
                                                                       seed=s, dtype=torch.float32))
              for s in (1, 2)]
    run_convert(ConvertConfig(models=[str(m) for m in models], out_dir=str(out), tokens=tokens, chunk=chunk,
                              block_samples=32, shard_samples=512), progress=False)
    return out


def trainer_sps(run_dir: Path, skip: int = 1) -> tuple[float, float | None]:
    """Mean perf/samples_per_s (and perf/mfu) of the logged train windows after the first ``skip``."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["kind"] == "train"][skip:]
    sps = sum(r["perf/samples_per_s"] for r in recs) / len(recs)
    mfu = [r["perf/mfu"] for r in recs if "perf/mfu" in r]
    return sps, (sum(mfu) / len(mfu) if mfu else None)


def run_trainer(nproc: int, overrides: list[str], run_dir: Path, env_extra: dict) -> None:
    env = {**os.environ, **env_extra}
    args = ["-m", "lsm_dist.train", *overrides, f"run_dir={run_dir}"]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *args]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"trainer failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    print(f"    ({nproc} proc: {time.time() - t0:.1f} s wall incl. start-up)")


def bench_cpu(root: Path, steps: int) -> None:
    corpus = make_corpus(root, 8, 64, 64, 128, 2)
    common = ["--config", "configs/train/tiny.yaml", f"corpus={corpus}", f"stage1_steps={steps}",
              "stage2_steps=0", "val_every=0", "ckpt_every=0", "export=false", "resume=none",
              f"log_every={max(steps // 5, 1)}", "cpu_threads=1", "verify_corpus=false"]
    print(f"CPU: tiny VAE (configs/vae/tiny.yaml), batch 16/rank, ZeRO-2, fp32, {steps} steps, "
          f"{torch.get_num_threads()} cores visible")
    res = {}
    for n in (1, 2):
        run = root / f"cpu-{n}"
        run_trainer(n, common, run, {"OMP_NUM_THREADS": "1"})
        res[n] = trainer_sps(run)[0]
        print(f"  {n} process(es): {res[n]:8.1f} samples/s (global)")
    print(f"  scaling 2 vs 1 process: {res[2] / res[1]:.2f}x (ideal 2.00x)")


def plain_loop_sps(cfg_path: Path, batch: int, steps: int, warmup: int = 10, device: torch.device | None = None,
                   precision: str = "fp32", compile: bool = False) -> tuple[float, float]:
    """A plain PyTorch loop over the same model: AdamW, MSE, z = mu, batches resident on the
    device; fp32 eager by default, or bf16 autocast and ``torch.compile`` (the ceiling).
    Returns (samples/s, MFU vs the bf16 peak; NaN without a known peak)."""
    from lsm_dist.config import load_config
    from lsm_dist.model import TransformerVAE, VAEConfig
    from lsm_dist.train.metrics import peak_flops

    cfg = load_config(VAEConfig, cfg_path)
    dev = device or torch.device("cuda")
    torch.manual_seed(0)
    model = TransformerVAE(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    xs = torch.randn(8, batch, cfg.tokens, cfg.chunk, device=dev)

    def step(x):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, sample=False)
            loss = torch.nn.functional.mse_loss(out["x_hat"].float(), x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    run = torch.compile(step) if compile else step
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        run(xs[i % len(xs)])
    sync()
    sps = steps * batch / (time.perf_counter() - t0)
    peak = peak_flops(dev) or float("nan")
    return sps, sps * model.flops_per_sample(training=True) / peak


def bench_gpu(root: Path, steps: int, batch: int, vae_config: str) -> None:
    if not torch.cuda.is_available():
        print("GPU: skipped (no CUDA device)")
        return
    ngpu = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    corpus = make_corpus(root, 16, 640, 640, 1728, 4)
    print(f"GPU: paper-size VAE ({vae_config}) on {ngpu}x {name}, batch {batch}/GPU, {steps} steps")
    run = root / "gpu-trainer"
    run_trainer(ngpu, ["--config", "configs/train/paper.yaml", f"model_config={vae_config}",
                       f"corpus={corpus}", f"batch_size={batch}",
                       f"stage1_steps={steps}", "stage2_steps=0", "val_every=0", "ckpt_every=0",
                       "export=false", "resume=none", f"log_every={max(steps // 10, 1)}", "precision=bf16",
                       "zero_stage=2", "num_workers=4", "verify_corpus=false", "warmup_steps=10"],
                run, {})
    t_sps, t_mfu = trainer_sps(run, skip=2)
    t_sps_gpu = t_sps / ngpu
    p_sps, p_mfu = plain_loop_sps(REPO / vae_config, batch, steps)
    print(f"  trainer bf16 ZeRO-2 : {t_sps_gpu:9.1f} samples/s/GPU  MFU {t_mfu if t_mfu is not None else float('nan'):.3f}")
    print(f"  plain fp32 eager    : {p_sps:9.1f} samples/s/GPU  MFU {p_mfu:.3f} (vs the bf16 peak)")
    print(f"  trainer / plain     : {t_sps_gpu / p_sps:.2f}x samples/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per measurement")
    ap.add_argument("--gpu-batch", type=int, default=64, help="per-GPU batch for the paper-size VAE")
    ap.add_argument("--vae-config", default="configs/vae/paper-175m.yaml",
                    help="VAE of the GPU measurement (paper-175m: Table 10 with 12+12 blocks, 175M "
                         "parameters; configs/vae/paper.yaml: Table 10 as printed, 90M)")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--workdir", help="keep corpora / runs here (default: a temp dir)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(a.workdir) if a.workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if not a.gpu_only:
            bench_cpu(root, a.steps)
        if not a.cpu_only:
            bench_gpu(root, a.steps, a.gpu_batch, a.vae_config)


if __name__ == "__main__":
    main()
