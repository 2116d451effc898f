"""Inference cost of hidden-state merging: generation tokens/s and peak memory, merger vs one model.

    python benchmarks/bench_hidden_merge.py [--hidden 512 --layers 8 --batch 1 8 --new 64]
                                            [--models DIR_A DIR_B] [--device cpu|cuda|all]

Each (device, batch, mode) runs in its own subprocess so that peak RSS is per mode. Modes:
  * ``hf``            one model, ``transformers`` ``model.generate`` (greedy, KV cache);
  * ``merge-lerp``    two models, LERP at every layer, logits mixed (``head=mix``);
  * ``merge-slerp``   same with SLERP;
  * ``merge-regmean`` same with RegMean (full d×d Grams, calibrated on random tokens);
  * ``merge-first``   LERP at the middle layer only, model 0's head (model 1 stops there).
Reports tokens/s (batch × new tokens / wall time, best of ``--repeats``), tokens per CPU-second
(process time: robust to other load on the machine; the "vs hf" ratio uses it on CPU when
``--threads 1``), the ratio to ``hf``,
the RSS after loading + warm-up and the process's peak RSS (``VmHWM``; loading included), and on CUDA
``max_memory_allocated``. Without a GPU the CUDA part prints a skip line and exits cleanly.
Models: random-init Llama of the given shape (same weights in every mode), or ``--models``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODES = ("hf", "merge-lerp", "merge-slerp", "merge-regmean", "merge-first")


def _status_mib(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak so far) of this process, MiB; ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_models(args, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.models:
        models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in args.models]
    else:
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.heads, max_position_embeddings=4096,
                          tie_word_embeddings=False)  # fmt: skip
        models = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            models.append(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    return [m.to(device=device, dtype=dtype).eval() for m in models]


def worker(args) -> dict:
    from lsm_dist.hidden import HiddenStateMerger

    device, mode, batch = args.device, args.mode, args.batch[0]
    torch.set_num_threads(args.threads)
    models = build_models(args, device)
    vocab = models[0].config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, args.prompt), generator=g).to(device)
    n_layers = models[0].config.num_hidden_layers
    if mode == "hf":
        models = models[:1]
        m = models[0]

        def gen(n):
            return m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, use_cache=True)  # fmt: skip
    else:
        op = {"merge-lerp": "lerp", "merge-slerp": "slerp", "merge-regmean": "regmean",
              "merge-first": "lerp"}[mode]  # fmt: skip
        layers = [n_layers // 2] if mode == "merge-first" else list(range(n_layers))
        merger = HiddenStateMerger(models, layers=layers, alpha=0.5, head="first" if mode == "merge-first" else "mix")
        if op == "regmean":
            merger.calibrate([(torch.randint(3, vocab, (4, 64), generator=g).to(device), None)])
        merger.set_mix(op=op)

        def gen(n):
            return merger.generate(ids, max_new_tokens=n, use_cache=True)

    cuda = device.startswith("cuda")
    with torch.no_grad():
        gen(4)  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss_loaded = _status_mib("VmRSS")
        best, best_cpu = float("inf"), float("inf")
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = gen(args.new)
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
    assert out.shape[1] == args.prompt + args.new, out.shape
    res = {"device": device, "mode": mode, "batch": batch, "tok_s": batch * args.new / best,
           "seconds": best, "cpu_seconds": best_cpu,
           "tok_per_cpu_s": batch * args.new / best_cpu, "rss_loaded_mib": rss_loaded,
           "peak_rss_mib": _status_mib("VmHWM")}  # fmt: skip
    if cuda:
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs=2, help="two model dirs (default: random-init Llama)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="generated tokens")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--device", default="all", help="cpu | cuda | all")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.mode:  # worker subprocess
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    results = []
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print("cuda: skipped (no CUDA device)")
            continue
        for batch in args.batch:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--mode", mode, "--device", device, "--batch", str(batch)]
                for k in ("hidden", "layers", "heads", "vocab", "dtype", "prompt", "new", "repeats", "threads"):
                    cmd += [f"--{k}", str(getattr(args, k))]
                if args.models:
                    cmd += ["--models", *args.models]
                env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return 1
                results.append(json.loads(lines[-1][7:]))
    key = "tok_per_cpu_s" if args.threads == 1 else "tok_s"  # CPU time resists machine load
    base = {(r["device"], r["batch"]): r for r in results if r["mode"] == "hf"}
    print(f"{'device':6} {'batch':>5} {'mode':14} {'tok/s':>9} {'tok/cpu-s':>9} {'vs hf':>6} "
          f"{'RSS load':>9} {'RSS peak':>9} {'CUDA peak':>9}")  # fmt: skip
    for r in results:
        b = base.get((r["device"], r["batch"]))
        k = "tok_s" if r["device"] != "cpu" else key
        rel = r[k] / b[k] if b else float("nan")
        cu = f"{r['cuda_peak_mib']:8.0f}M" if "cuda_peak_mib" in r else "        -"
        print(f"{r['device']:6} {r['batch']:5d} {r['mode']:14} {r['tok_s']:9.1f} {r['tok_per_cpu_s']:9.1f} "
              f"{rel:6.2f} {r['rss_loaded_mib']:8.0f}M {r['peak_rss_mib']:8.0f}M {cu}")  # fmt: skip
    print(f"(vs hf: ratio of {'tokens per CPU-second' if key == 'tok_per_cpu_s' else 'tokens/s'} on CPU, "
          "tokens/s on CUDA)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
