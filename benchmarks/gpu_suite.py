"""The GPU figures in one run (issue: trainer vs the hardware, and a 7B-shaped encode + decode).

    bash benchmarks/gpu_suite.sh [--smoke] [--out DIR] [--skip ties] ...

Each section measures its figure and its baseline in the same run and writes everything to
``OUT/gpu_suite.json`` (+ ``OUT/profile.txt``, the profiler table), printing one line per figure:

1. **trainer**: the paper-size VAE (``configs/vae/paper-175m.yaml``, 16 × 640 samples) through
   the project's trainer (DeepSpeed ZeRO-2, bf16, one GPU) on a corpus on local disk read by the
   project's reader: samples/s, TFLOP/s, MFU against the dense bf16 peak, the wait for data per
   step; against (a) a plain fp32 eager PyTorch loop over the same model and (b) a bf16 +
   ``torch.compile`` plain loop (the ceiling). Targets: ≥ 30K samples/s, ≥ 10× (a), within 10 %
   of (b).
2. **reader**: the project's reader with one worker per core: samples/s vs what the trainer
   consumed (target ≥ 1.5×).
3. **encode + decode** of a Qwen2-7B-shaped checkpoint (random bf16 weights in its exact
   attention / MLP shapes, generated here) through ``lsm merge`` (the model lerped with itself
   in latent space, direct decoding: one encode and one decode of every sample): GPU compute
   (encode + decode) ≤ 15 s, end to end ≤ 90 s; ratio to a raw read + write of the same bytes.
4. **ties** (optional, ``--skip ties`` to leave out): weight-space TIES of a 7B-shaped pair with
   ``device: cuda`` against ``mergekit-yaml --cuda`` on the same pair: wall time and peak host
   RSS of each (target ≤ 1.0× mergekit's time).
5. **profile**: the torch profiler's top operators of five trainer-model steps (bf16).

``--smoke`` runs every section end to end with tiny sizes on whatever device there is (the CPU
in CI): the code path, not the figures. Without ``--smoke`` and without CUDA it stops at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SECTIONS = ("trainer", "reader", "encode_decode", "ties", "profile")
# Qwen2-7B: 28 layers, hidden 3584, MLP 18944, 28 heads / 4 KV heads of 128
QWEN7B = dict(layers=28, hidden=3584, inter=18944, heads=28, kv=4, vocab=152064)
SMOKE_SHAPE = dict(layers=2, hidden=64, inter=160, heads=4, kv=2, vocab=256)


def peak_rss_of(cmd: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """(wall s, peak RSS MiB of the process tree, exit code) of a command, RSS sampled."""
    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    proc = psutil.Process(p.pid)
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = p.stdout.read()
    if p.returncode != 0:
        print(out[-3000:], file=sys.stderr)
    return time.perf_counter() - t0, peak, p.returncode


def qwen_tensors(shape: dict, seed: int, device: str) -> dict[str, torch.Tensor]:
    """Every tensor of a Qwen2 checkpoint in its names and shapes (embeddings, q/k/v with
    biases, o, gated MLP, norms, untied head), bf16, std 0.02 (generated on ``device``: a 7B
    model's worth of randn is seconds on a GPU, minutes on a CPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, m, hd, v = shape["hidden"], shape["inter"], shape["hidden"] // shape["heads"], shape["vocab"]
    kv = shape["kv"] * hd

    def w(*s, scale=0.02):
        return (torch.randn(*s, generator=g, device=device) * scale).to(torch.bfloat16).cpu()

    out = {"model.embed_tokens.weight": w(v, h)}
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        for name, s in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h))]:
            out[p + name + ".weight"] = w(*s)
            out[p + name + ".bias"] = w(s[0])
        for name, s in [("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (m, h)), ("mlp.up_proj", (m, h)),
                        ("mlp.down_proj", (h, m))]:
            out[p + name + ".weight"] = w(*s)
        out[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        out[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out["lm_head.weight"] = w(v, h)
    return out


def write_model(path: Path, tensors: dict[str, torch.Tensor], shape: dict) -> Path:
    """A Qwen2 checkpoint directory transformers and mergekit load: the tensors + config.json."""
    from tests.helpers import write_checkpoint

    write_checkpoint(path, tensors, shards=max(1, shape["layers"] // 4))
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": shape["hidden"],
           "intermediate_size": shape["inter"], "num_hidden_layers": shape["layers"],
           "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv"], "vocab_size": shape["vocab"],
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


# ------------------------------------------------------------------------------ sections
def trainer(a, root: Path, res: dict) -> None:
    from bench_train import make_corpus, plain_loop_sps, trainer_sps

    from lsm_dist.config import load_config
    from lsm_dist.model import TransformerVAE, VAEConfig
    from lsm_dist.train.metrics import peak_flops

    cuda = torch.cuda.is_available()
    corpus = make_corpus(root, a.tokens, a.chunk, a.corpus_hidden, a.corpus_hidden * 2, 2 if a.smoke else 4)
    res["corpus"] = str(corpus)
    run = root / "trainer"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "lsm_dist.train", "--config", "configs/train/paper.yaml",
           f"model_config={a.vae_config}", f"corpus={corpus}", f"batch_size={a.batch}",
           f"stage1_steps={a.steps}", "stage2_steps=0", "val_every=0", "ckpt_every=0", "export=false",
           "resume=none", f"log_every={max(a.steps // 5, 1)}", f"precision={'bf16' if cuda else 'fp32'}",
           "zero_stage=2", f"num_workers={0 if a.smoke else 4}", "verify_corpus=false", "warmup_steps=2",
           f"run_dir={run}"]
    wall, rss, rc = peak_rss_of(cmd, {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if rc != 0:
        raise SystemExit(f"trainer failed (exit {rc})")
    sps, mfu = trainer_sps(run, skip=1)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    wait = [r["perf/data_wait_ms"] for r in recs if r.get("kind") == "train" and "perf/data_wait_ms" in r][1:]
    cfg = load_config(VAEConfig, REPO / a.vae_config)
    fps = TransformerVAE(cfg).flops_per_sample(training=True)
    dev = torch.device("cuda" if cuda else "cpu")
    t = {"samples_per_s": sps, "tflops": sps * fps / 1e12, "mfu": mfu, "peak_flops": peak_flops(dev),
         "data_wait_ms_per_step": sum(wait) / len(wait) if wait else None, "wall_s": wall, "peak_rss_mib": rss,
         "batch": a.batch, "steps": a.steps, "vae_config": a.vae_config}
    eager, _ = plain_loop_sps(REPO / a.vae_config, a.batch, a.steps, warmup=2, device=dev, precision="fp32")
    ceiling, _ = plain_loop_sps(REPO / a.vae_config, a.batch, a.steps, warmup=3, device=dev,
                                precision="bf16" if cuda else "fp32", compile=True)
    t |= {"plain_fp32_eager_samples_per_s": eager, "compiled_ceiling_samples_per_s": ceiling,
          "ratio_to_eager": sps / eager, "ratio_to_ceiling": sps / ceiling,
          "targets": {"samples_per_s": 30_000, "ratio_to_eager": 10.0, "ratio_to_ceiling": 0.9}}
    res["trainer"] = t
    print(f"trainer: {sps:,.0f} samples/s ({t['tflops']:.2f} TFLOP/s, MFU {mfu if mfu is not None else float('nan'):.3f}); "
          f"{t['ratio_to_eager']:.2f}x plain fp32 eager, {t['ratio_to_ceiling']:.2f}x the compiled loop; "
          f"data wait {t['data_wait_ms_per_step'] or 0:.2f} ms/step")


def reader(a, root: Path, res: dict) -> None:
    from lsm_dist.corpus.reader import Corpus, CorpusStream, make_loader

    corpus = Corpus(Path(res.get("corpus") or root / f"corpus-{a.tokens}x{a.chunk}"))
    workers = 2 if a.smoke else max(1, (os.cpu_count() or 2))
    stream = CorpusStream(corpus, batch_size=256, seed=0, resampled=False)
    loader = make_loader(stream, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += batch["x"].shape[0]
    sps = n / (time.perf_counter() - t0)
    need = res.get("trainer", {}).get("samples_per_s")
    res["reader"] = {"samples_per_s": sps, "workers": workers, "samples": n,
                     "ratio_to_trainer": sps / need if need else None, "target_ratio": 1.5}
    print(f"reader: {sps:,.0f} samples/s with {workers} workers" + (f" = {sps / need:.2f}x the trainer" if need else ""))


def encode_decode(a, root: Path, res: dict) -> None:
    from bench_convert import copy_baseline

    from lsm_dist.merge.decode import run_decode
    from lsm_dist.merge.encode import run_encode
    from lsm_dist.merge.plan import load_plan
    from lsm_dist.merge.run import prepare, run_assemble

    shape = SMOKE_SHAPE if a.smoke else QWEN7B
    gen_dev = "cuda" if torch.cuda.is_available() else "cpu"
    ck = root / "qwen-a"
    t0 = time.perf_counter()
    if not (ck / "config.json").is_file():
        write_model(ck, qwen_tensors(shape, 0, gen_dev), shape)
    gen_s = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
    copy_s = copy_baseline(ck, root / "copy")
    shutil.rmtree(root / "copy", ignore_errors=True)
    vae = root / "vae"
    if not (vae / "config.json").is_file():
        from lsm_dist.config import load_config
        from lsm_dist.model import TransformerVAE, VAEConfig, save_vae

        torch.manual_seed(0)
        save_vae(TransformerVAE(load_config(VAEConfig, REPO / a.vae_config)), vae)  # speed, not quality
    out = root / "merge"
    shutil.rmtree(out, ignore_errors=True)
    plan = root / "lerp-self.yaml"
    plan.write_text(json.dumps({"models": {"a": str(ck), "b": str(ck)}, "target": "a", "method": "lerp",
                                "params": {"lambda": 0.5}, "space": "latent", "decode": "direct", "vae": str(vae),
                                "out_dir": str(out), "cache_dir": str(root / "latent_cache"),
                                "batch_size": a.merge_batch, "overwrite": True}))
    plan = load_plan(plan)
    shutil.rmtree(root / "latent_cache", ignore_errors=True)
    t_all = time.perf_counter()
    rp = prepare(plan)
    t = time.perf_counter()
    run_encode(rp)
    _sync()
    enc = time.perf_counter() - t
    t = time.perf_counter()
    run_decode(rp)
    _sync()
    dec = time.perf_counter() - t
    run_assemble(rp)
    total = time.perf_counter() - t_all
    res["encode_decode"] = {"shape": shape, "bytes": nbytes, "generate_s": gen_s, "encode_s": enc, "decode_s": dec,
                            "compute_s": enc + dec, "end_to_end_s": total, "raw_read_write_s": copy_s,
                            "ratio_to_raw_copy": total / copy_s,
                            "targets": {"compute_s": 15.0, "end_to_end_s": 90.0}}
    print(f"encode+decode ({nbytes / 2**30:.2f} GiB): encode {enc:.1f} s, decode {dec:.1f} s, end to end "
          f"{total:.1f} s = {total / copy_s:.1f}x a raw read+write ({copy_s:.1f} s)")


def ties(a, root: Path, res: dict) -> None:
    shape = SMOKE_SHAPE if a.smoke else QWEN7B
    gen_dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = root / "qwen-a"
    if not (base / "config.json").is_file():
        write_model(base, qwen_tensors(shape, 0, gen_dev), shape)
    pair = [root / "qwen-b", root / "qwen-c"]
    for i, p in enumerate(pair):
        if not (p / "config.json").is_file():
            t = qwen_tensors(shape, 0, gen_dev)
            d = qwen_tensors(shape, 10 + i, gen_dev)
            write_model(p, {k: (t[k].float() + 0.1 * d[k].float()).to(torch.bfloat16) for k in t}, shape)
    cuda = torch.cuda.is_available()
    plan = root / "ties.yaml"
    plan.write_text(json.dumps({"models": {"base": str(base), "b": str(pair[0]), "c": str(pair[1])}, "base": "base",
                                "method": "ties", "params": {"density": 0.5}, "space": "weight",
                                "device": "cuda" if cuda else "cpu", "out_dir": str(root / "ties-lsm"),
                                "overwrite": True, "rest": "target"}))
    ours = peak_rss_of([str(Path(sys.executable).parent / "lsm"), "merge", str(plan)])
    mk = root / "ties-mk.yml"
    mk.write_text(json.dumps({"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
                              "models": [{"model": str(p), "parameters": {"density": 0.5, "weight": 1.0}} for p in pair]}))
    mk_bin = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    theirs = peak_rss_of([mk_bin, str(mk), str(root / "ties-mk"), *(["--cuda"] if cuda else []), "--no-write-model-card"])
    res["ties"] = {"lsm_s": ours[0], "lsm_peak_rss_mib": ours[1], "lsm_rc": ours[2], "mergekit_s": theirs[0],
                   "mergekit_peak_rss_mib": theirs[1], "mergekit_rc": theirs[2], "ratio": ours[0] / theirs[0],
                   "target_ratio": 1.0}
    print(f"ties: lsm {ours[0]:.1f} s ({ours[1]:.0f} MiB) vs mergekit {theirs[0]:.1f} s ({theirs[1]:.0f} MiB): "
          f"{ours[0] / theirs[0]:.2f}x")


def profile(a, root: Path, res: dict, out: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from lsm_dist.config import load_config
    from lsm_dist.model import TransformerVAE, VAEConfig, vae_loss

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(VAEConfig, REPO / a.vae_config)
    model = TransformerVAE(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch, cfg.tokens, cfg.chunk, device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = vae_loss(model(x, sample=False), x, beta=0.0)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with prof(activities=acts) as p:
        for _ in range(5):
            step()
        _sync()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    table = p.key_averages().table(sort_by=key, row_limit=20)
    (out / "profile.txt").write_text(table)
    res["profile"] = {"file": "profile.txt", "sorted_by": key, "steps": 5}
    print(f"profile: top operators by {key} in {out / 'profile.txt'}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CI)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_suite_out")
    ap.add_argument("--workdir", default=None, help="corpora, checkpoints, runs (default: OUT/work)")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (use --smoke for the code path on the CPU)", file=sys.stderr)
        return 2
    a = argparse.Namespace(
        smoke=args.smoke, steps=args.steps or (6 if args.smoke else 100),
        vae_config="configs/vae/tiny.yaml" if args.smoke else "configs/vae/paper-175m.yaml",
        tokens=8 if args.smoke else 16, chunk=64 if args.smoke else 640, batch=16 if args.smoke else 640,
        corpus_hidden=64 if args.smoke else 640, merge_batch=256 if args.smoke else 8192)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.workdir or out / "work")
    root.mkdir(parents=True, exist_ok=True)
    res: dict = {"smoke": args.smoke, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "errors": {}}
    for name in SECTIONS:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            if name == "profile":
                profile(a, root, res, out)
            else:
                globals()[name](a, root, res)
        except Exception as e:  # one section's failure must not lose the others' figures
            res["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        res.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
        (out / "gpu_suite.json").write_text(json.dumps(res, indent=1, default=str))  # after every section
    print(f"figures: {out / 'gpu_suite.json'}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
