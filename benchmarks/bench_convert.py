"""Conversion throughput and memory vs a plain copy of the same safetensors bytes (same run).

    python benchmarks/bench_convert.py [--largest-mb 16] [--factor 10] [--workers 1 2] [--formats 2 1]

Writes a synthetic bf16 checkpoint in Llama layer shapes whose total size is ``factor`` times
the memory bound (2 × largest tensor + 500 MB), then measures:
  * baseline: read + write (+ fsync) of the checkpoint's bytes, file by file;
  * ``lsm convert`` (paper sample 16 × 640) with N workers and corpus format F, in a subprocess,
    wall time and peak RSS of the largest worker. Format 2 (the default) reads every tensor
    twice (the NaN/stats scan before any shard is written, then the write) and writes the
    weights' own bytes; format 1 writes standardized float32 samples and fixups.
Prints MB/s (input bytes), the ratio convert/copy (target ≥ 0.8 for format 2) and peak RSS vs
the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.helpers import write_checkpoint  # noqa: E402


def make_checkpoint(path: Path, largest_mb: float, total_mb: float) -> tuple[int, int]:
    """Llama-shaped bf16 layers: mlp (inter × hidden) is the largest tensor."""
    hidden = 1024
    inter = int(largest_mb * 2**20 / 2 / hidden)
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter)
    layers = max(1, int(total_mb * 2**20 / per_layer) + 1)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                            ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))]:
            tensors[p + name + ".weight"] = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    write_checkpoint(path, tensors, shards=max(1, layers // 4))
    return sum(t.numel() * 2 for t in tensors.values()), inter * hidden * 2


def copy_baseline(src: Path, dst: Path) -> float:
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as r, open(dst / f.name, "wb") as w:
            shutil.copyfileobj(r, w, 1 << 22)
            w.flush()
            os.fsync(w.fileno())
    return time.perf_counter() - t0


def run_convert(src: Path, out: Path, workers: int, fmt: int) -> tuple[float, float, float]:
    """(wall s incl. interpreter start, s inside the conversion, peak RSS MiB) of `lsm convert`."""
    # peak RSS sampled with psutil (ru_maxrss is inherited across fork+exec, so it would report
    # this benchmark's own peak from generating the checkpoint); paths travel as argv, never
    # inside the code string
    code = (
        "import json,sys,threading,time,psutil,torch;import lsm_dist.corpus.convert;from lsm_dist.cli import main\n"
        "src,out,workers,fmt=sys.argv[1:]\n"
        "peak=[0];me=psutil.Process();stop=threading.Event()\n"
        "def watch():\n"
        "  while not stop.is_set():\n"
        "    try:\n"
        "      r=[me.memory_info().rss]+[c.memory_info().rss for c in me.children(recursive=True)]\n"
        "      peak[0]=max(peak[0],max(r))\n"
        "    except psutil.Error: pass\n"
        "    time.sleep(0.02)\n"
        "threading.Thread(target=watch,daemon=True).start()\n"
        "t0=time.perf_counter()\n"
        "rc=main(['convert',f'models=[{src}]',f'out_dir={out}',f'num_workers={workers}','tokens=16','chunk=640',"
        "f'format_version={fmt}'])\n"
        "t=time.perf_counter()-t0;stop.set();print('RSS',json.dumps([peak[0]//1024,t]));sys.exit(rc)"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, str(src), str(out), str(workers), str(fmt)], cwd=REPO, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    peak_kb, inside = json.loads(p.stdout.split("RSS", 1)[1])
    return wall, inside, peak_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--largest-mb", type=float, default=16.0)
    ap.add_argument("--factor", type=float, default=10.0, help="checkpoint size / memory bound")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--formats", type=int, nargs="+", default=[2, 1], help="corpus format versions to write")
    ap.add_argument("--repeat", type=int, default=1, help="baseline + conversion pairs per setting")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    bound_mb = 2 * args.largest_mb + 500
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_convert_"))
    src = root / "ckpt"
    t0 = time.perf_counter()
    total, largest = make_checkpoint(src, args.largest_mb, args.factor * bound_mb)
    os.sync()  # its dirty pages on disk first, or they slow down whatever is measured next
    print(f"checkpoint: {total / 2**20:.0f} MiB bf16, largest tensor {largest / 2**20:.1f} MiB, "
          f"bound 2x largest + 500 MiB = {2 * largest / 2**20 + 500:.0f} MiB "
          f"(checkpoint = {total / 2**20 / (2 * largest / 2**20 + 500):.1f}x bound), made in {time.perf_counter() - t0:.0f} s")
    bound = 2 * largest / 2**20 + 500
    for fmt in args.formats:
        for w in args.workers:
            ratios = []
            for _ in range(args.repeat):
                t_copy = copy_baseline(src, root / "copy")  # next to each conversion: storage speed drifts
                shutil.rmtree(root / "copy")
                mbs_copy = total / 2**20 / t_copy
                print(f"baseline read+write+fsync: {t_copy:.1f} s, {mbs_copy:.0f} MiB/s")
                out = root / f"corpus{w}"
                wall, inside, rss = run_convert(src, out, w, fmt)
                mbs = total / 2**20 / inside
                out_mb = sum(f.stat().st_size for f in out.glob("*.tar")) / 2**20
                ratios.append(mbs / mbs_copy)
                target = " (target >= 0.8)" if fmt == 2 else ""
                print(f"convert format={fmt} workers={w}: {inside:.1f} s ({wall:.1f} s wall with interpreter + imports), "
                      f"{mbs:.0f} MiB/s in, {out_mb:.0f} MiB out; ratio vs copy {mbs / mbs_copy:.2f}{target} "
                      f"({total / 2**20 / wall / mbs_copy:.2f} with start-up); peak RSS {rss:.0f} MiB "
                      f"(bound {bound:.0f} MiB: {'OK' if rss <= bound else 'OVER'})")
                shutil.rmtree(out)
            if args.repeat > 1:
                ratios.sort()
                print(f"format={fmt} workers={w}: ratio vs copy median {ratios[len(ratios) // 2]:.2f}, "
                      f"range {ratios[0]:.2f}-{ratios[-1]:.2f} over {args.repeat} runs")
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
