"""Merge-engine benchmarks.

``cpu``: peak resident memory of a whole latent merge (encode 2 models → lerp → decode →
assemble) of a checkpoint at least 10× larger than one tensor's working set + the VAE. The
merge runs in a child process; its ``ru_maxrss`` is compared with a baseline child that only
imports the engine, loads the VAE and encodes + decodes one batch (interpreter, torch, VAE,
batch activations), plus the analytic per-tensor working set (``WS_BYTES_PER_ELEM`` bytes per
element of the largest tensor: the tensor, its float32 copy, the operands' latents, the
decoded samples and the float64 de-normalization temporaries).

``gpu``: encode + decode round trip of a Llama-2-7B-shaped checkpoint (random bf16 weights
generated on the host) with the paper-size VAE (configs/vae/paper.yaml, random init) in bf16
autocast: GPU compute time (VAE encode + decode over every sample, CUDA-synchronized), end-to-end
time of the merge run (identity soup: z = mu), and its ratio to a raw read + write of the same
bytes. Skips cleanly without CUDA; ``--preset tiny --device cpu`` runs the same code path small.

    python benchmarks/bench_merge.py cpu            # ~2 min on 2 cores
    python benchmarks/bench_merge.py gpu            # needs CUDA and ~60 GB of disk
    python benchmarks/bench_merge.py gpu --preset tiny --device cpu   # smoke test of the path
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lsm_dist.utils import human_bytes as human  # noqa: E402

WS_BYTES_PER_ELEM = 32
PRESETS = {  # Llama-2-7B shapes, and a small stand-in with the same structure
    "7b": dict(hidden=4096, inter=11008, layers=32, vocab=32000, heads=32, kv_heads=32),
    "tiny": dict(hidden=256, inter=688, layers=2, vocab=1000, heads=4, kv_heads=4),
}


def layer_shapes(hidden: int, inter: int, kv_heads: int, heads: int) -> dict[str, tuple[int, int]]:
    kv = hidden * kv_heads // heads
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


def write_llama(path: Path, hidden: int, inter: int, layers: int, vocab: int, heads: int, kv_heads: int,
                seed: int, noise_of: Path | None = None, device: str = "cpu") -> int:
    """A Llama-shaped bf16 checkpoint, one shard per layer; ``noise_of``: that model + 10% noise."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "vocab_size": vocab, "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator(device=device).manual_seed(seed)
    n = layers + 1
    weight_map, total = {}, 0

    def rnd(shape):
        return (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    for i in range(n):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i < layers:
            tensors = {f"model.layers.{i}.{k}.weight": rnd(s) for k, s in layer_shapes(hidden, inter, kv_heads, heads).items()}
            tensors |= {f"model.layers.{i}.{k}.weight": torch.ones(hidden, dtype=torch.bfloat16)
                        for k in ("input_layernorm", "post_attention_layernorm")}
        else:
            tensors = {"model.embed_tokens.weight": rnd((vocab, hidden)), "lm_head.weight": rnd((vocab, hidden)),
                       "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        if noise_of is not None:
            from safetensors.torch import load_file

            src = load_file(str(noise_of / fname))
            tensors = {k: (src[k].float() + 0.1 * v.float()).to(torch.bfloat16) for k, v in tensors.items()}
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in tensors}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def child(cmd: list[str], env: dict | None = None) -> dict:
    """Run this script's hidden sub-command in a fresh process; its last stdout line is JSON."""
    env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, __file__, *cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss() -> int:
    """Peak resident set of this process image: VmHWM (``ru_maxrss`` is not reset by exec on
    Linux, so a child started from a big parent would report the parent's size)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ------------------------------------------------------------------------------ children
def _child_baseline(vae_dir: str, batch: int) -> None:
    import lsm_dist.merge  # noqa: F401  (the same imports as a merge)
    from lsm_dist.model import load_vae

    imports = peak_rss()
    vae = load_vae(vae_dir)
    with torch.no_grad():
        mu, _ = vae.encode(torch.randn(batch, vae.cfg.tokens, vae.cfg.chunk))
        vae.decode(mu)
    print(json.dumps({"peak_rss": peak_rss(), "import_rss": imports}))


def _child_merge(plan_path: str) -> None:
    from lsm_dist.merge import run_merge

    imports = peak_rss()
    t = time.perf_counter()
    out = run_merge(plan_path)
    print(json.dumps({"peak_rss": peak_rss(), "import_rss": imports, "wall_s": time.perf_counter() - t,
                      "out": str(out)}))


# ---------------------------------------------------------------------------------- cpu
def _cpu_merge(work: Path, layers: int, args, vae_dir: Path, env: dict) -> tuple[int, dict]:
    import yaml

    shapes = dict(hidden=args.hidden, inter=args.inter, layers=layers, vocab=args.vocab, heads=8, kv_heads=4)
    d = work / f"L{layers}"
    nbytes = write_llama(d / "base", **shapes, seed=0)
    write_llama(d / "expert", **shapes, seed=1, noise_of=d / "base")
    plan = {"models": {"base": str(d / "base"), "expert": str(d / "expert")}, "target": "base",
            "method": "lerp", "params": {"lambda": 0.5}, "vae": str(vae_dir), "out_dir": str(d / "out"),
            "cache_dir": str(d / "cache"), "batch_size": args.batch, "device": "cpu",
            "max_shard_size": "100MB"}
    (d / "plan.yaml").write_text(yaml.safe_dump(plan))
    return nbytes, child(["_merge", str(d / "plan.yaml")], env)


def bench_cpu(args) -> dict:
    from lsm_dist.model import TransformerVAE, VAEConfig, save_vae

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_merge_"))
    vcfg = VAEConfig(chunk=256, tokens=8, d_model=64, enc_layers=2, dec_layers=2, heads=4, latent_dim=64,
                     token_stride=2)
    torch.manual_seed(0)
    vae_dir = save_vae(TransformerVAE(vcfg), work / "vae")
    vae_bytes = sum(p.numel() * 4 for p in TransformerVAE(vcfg).parameters())
    n_max = max(a * b for a, b in layer_shapes(args.hidden, args.inter, 4, 8).values())
    ws = WS_BYTES_PER_ELEM * n_max
    env = {"OMP_NUM_THREADS": str(args.threads)}
    base = child(["_baseline", str(vae_dir), str(args.batch)], env)
    small_bytes, small = _cpu_merge(work, min(4, args.layers), args, vae_dir, env)
    nbytes, res = _cpu_merge(work, args.layers, args, vae_dir, env)
    # bound: the merge child's own post-import RSS + (VAE + one batch, from the baseline child)
    # + one tensor's working set
    vae_batch = base["peak_rss"] - base["import_rss"]
    bound = res["import_rss"] + vae_batch + ws
    grow = (res["peak_rss"] - res["import_rss"]) - (small["peak_rss"] - small["import_rss"])
    report = {
        "checkpoint_bytes": nbytes, "largest_tensor_elems": n_max, "working_set_bytes": ws,
        "vae_bytes": vae_bytes, "checkpoint_over_ws_plus_vae": nbytes / (ws + vae_bytes),
        "import_rss": res["import_rss"], "vae_and_batch_rss": vae_batch, "bound_rss": bound,
        "peak_rss": res["peak_rss"], "peak_over_imports": res["peak_rss"] - res["import_rss"],
        "within_bound": res["peak_rss"] <= bound, "merge_wall_s": res["wall_s"],
        "small_checkpoint_bytes": small_bytes, "small_peak_over_imports": small["peak_rss"] - small["import_rss"],
        "growth_small_to_large": grow, "work": str(work),
    }  # fmt: skip
    print(f"[cpu] checkpoint {human(nbytes)} per model (x2 models), {args.layers} layers, largest tensor "
          f"{n_max:,} elements")
    print(f"[cpu] one tensor's working set {human(ws)} ({WS_BYTES_PER_ELEM} B/elem) + VAE {human(vae_bytes)}: "
          f"checkpoint is {report['checkpoint_over_ws_plus_vae']:.1f}x larger")
    print(f"[cpu] RSS after imports {human(res['import_rss'])}; VAE + one batch of {args.batch} adds "
          f"{human(vae_batch)} (baseline child); bound = imports + VAE/batch + working set = {human(bound)}")
    print(f"[cpu] measured peak RSS of the merge {human(res['peak_rss'])} "
          f"(+{human(report['peak_over_imports'])} over its imports) -> "
          f"{'WITHIN' if report['within_bound'] else 'ABOVE'} bound; merge wall {res['wall_s']:.1f}s")
    print(f"[cpu] same merge of a {human(small_bytes)} checkpoint: +{human(report['small_peak_over_imports'])} "
          f"over imports; growth with {nbytes / small_bytes:.0f}x the data: {human(grow)}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return report


# ---------------------------------------------------------------------------------- gpu
def bench_gpu(args) -> dict | None:
    import yaml

    from lsm_dist.config import load_config
    from lsm_dist.merge.io import autocast
    from lsm_dist.model import TransformerVAE, VAEConfig, save_vae

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and args.preset == "7b":
        print("[gpu] skipped: no CUDA device (use --preset tiny --device cpu for a smoke test)")
        return None
    shapes = PRESETS[args.preset] | ({"layers": args.layers} if args.layers else {})
    vcfg = load_config(VAEConfig, REPO / "configs/vae" / f"{'paper' if args.preset == '7b' else 'tiny'}.yaml")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_merge_gpu_"))
    t = time.perf_counter()
    nbytes = write_llama(work / "model", **shapes, seed=0, device=device.type)
    print(f"[gpu] wrote {human(nbytes)} {args.preset}-shaped checkpoint in {time.perf_counter() - t:.0f}s")
    torch.manual_seed(0)
    vae_dir = save_vae(TransformerVAE(vcfg), work / "vae")
    # GPU compute: the VAE over as many samples as the round trip encodes and decodes
    from lsm_dist.checkpoint import Checkpoint
    from lsm_dist.chunking import ChunkSpec

    spec = ChunkSpec(vcfg.tokens, vcfg.chunk)
    with Checkpoint(work / "model") as ck:
        n_samples = sum(spec.num_samples(t.numel) for t in ck.select(("attn", "mlp")))
    vae = TransformerVAE(vcfg).to(device).eval()
    x = torch.randn(args.batch, vcfg.tokens, vcfg.chunk, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), autocast(device):
        vae.decode(vae.encode(x)[0])
        sync()
        t, reps = time.perf_counter(), 5
        for _ in range(reps):
            vae.decode(vae.encode(x)[0])
        sync()
    per_sample = (time.perf_counter() - t) / (reps * args.batch)
    compute_s = per_sample * n_samples
    # raw I/O of the same bytes: read the checkpoint, write as many bytes (fsync)
    t = time.perf_counter()
    files = sorted((work / "model").glob("*.safetensors"))
    with open(work / "raw.bin", "wb") as out:
        for f in files:
            with open(f, "rb") as fh:
                while buf := fh.read(1 << 26):
                    out.write(buf)
        out.flush()
        os.fsync(out.fileno())
    raw_s = time.perf_counter() - t
    (work / "raw.bin").unlink()  # disk: a 7B round trip needs ~4 checkpoint sizes
    plan = {"models": {"m": str(work / "model")}, "method": "soup", "params": {"weights": [1.0]},
            "vae": str(vae_dir), "out_dir": str(work / "out"), "cache_dir": str(work / "cache"),
            "batch_size": args.batch, "device": str(device), "latent_dtype": "bfloat16", "max_shard_size": "5GB"}
    (work / "plan.yaml").write_text(yaml.safe_dump(plan))
    res = child(["_merge", str(work / "plan.yaml")])
    report = {"device": str(device), "preset": args.preset, "checkpoint_bytes": nbytes, "samples": n_samples,
              "vae_params": sum(p.numel() for p in vae.parameters()), "gpu_compute_s": compute_s,
              "end_to_end_s": res["wall_s"], "raw_read_write_s": raw_s, "ratio_to_raw_io": res["wall_s"] / raw_s}
    print(f"[gpu] {n_samples:,} samples, VAE {report['vae_params'] / 1e6:.1f}M params on {device}: "
          f"compute {compute_s:.1f}s, end-to-end {res['wall_s']:.1f}s, raw read+write {raw_s:.1f}s "
          f"(ratio {report['ratio_to_raw_io']:.1f}x)")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_baseline"]:
        _child_baseline(argv[1], int(argv[2]))
        return 0
    if argv[:1] == ["_merge"]:
        _child_merge(argv[1])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", nargs="?", default="all", choices=["cpu", "gpu", "all"])
    p.add_argument("--layers", type=int, default=None, help="cpu: default 48; gpu: preset depth")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the merge child (1 is fastest for tiny VAEs on small VMs)")
    p.add_argument("--preset", default="7b", choices=list(PRESETS))
    p.add_argument("--device", default=None)
    p.add_argument("--work", default=None, help="working directory (kept)")
    p.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    p.add_argument("--json", default=None, help="also write the report(s) here")
    args = p.parse_args(argv)
    reports = {}
    if args.part in ("cpu", "all"):
        cpu_args = argparse.Namespace(**{**vars(args), "layers": args.layers or 48})
        reports["cpu"] = bench_cpu(cpu_args)
    if args.part in ("gpu", "all"):
        reports["gpu"] = bench_gpu(args)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
