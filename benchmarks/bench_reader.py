"""Streaming reader throughput: corpus format 2 vs format 1 of the same weights, and vs `cat`.

    python benchmarks/bench_reader.py [--mb 1024] [--workers 0 2] [--batch 256] [--repeat 3]

Builds (or reuses, with --dir) one synthetic bf16 checkpoint in Llama shapes and converts it
twice with the paper's sample size (16 × 640): format 2 (the weights' own bf16 values, 20 KiB
per sample, standardized by the reader) and format 1 (standardized float32, 40 KiB per sample).
``--mb`` is the format-1 corpus size. Then, with a cold page cache (when it can be dropped)
and a warm one, one pass of
  * baseline: `cat` of the format-1 shards, as samples/s;
  * CorpusStream with the indexed backend, in the trainer process and with N loader workers
    (threads, and DataLoader worker processes), for format 1 and format 2 back to back (median
    of ``--repeat`` passes each), and the webdataset backend in-process;
every figure incl. worker start-up. Prints samples/s, the format-2 / format-1 ratio (target
≥ 1) and the per-core rate against what the paper-size trainer consumes (~30K samples/s per GPU;
target ≥ 1.5× that per GPU on a 16-core host).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GPU_RATE = 30_000  # samples/s one GPU consumes training the paper-size VAE (benchmarks/README.md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1024, help="format-1 corpus size in MiB (format 2 is half)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader workers (0: in-process)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shuffle-buffer", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3, help="passes per figure (the median is printed)")
    ap.add_argument("--warm-only", "--no-cold", dest="no_cold", action="store_true",
                    help="skip the cold-page-cache runs (they drop the whole machine's page cache)")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from bench_convert import make_checkpoint

    from lsm_dist.corpus import ConvertConfig, run_convert
    from lsm_dist.corpus.reader import Corpus, CorpusStream, make_loader

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_reader_"))
    if not all((root / f"v{v}" / "manifest.json").is_file() for v in (1, 2)):
        if not (root / "ckpt").is_dir():
            make_checkpoint(root / "ckpt", largest_mb=8, total_mb=args.mb / 2)
        for v in (1, 2):
            run_convert(ConvertConfig(models=[str(root / "ckpt")], out_dir=str(root / f"v{v}"), num_workers=2,
                                      format_version=v), progress=False)
    corpora = {v: Corpus(root / f"v{v}") for v in (1, 2)}
    n = corpora[2].num_samples
    assert corpora[1].num_samples == n
    for v, c in corpora.items():
        total = sum(s["bytes"] for s in c.shards)
        print(f"format {v}: {n} samples of {c.tokens}x{c.chunk} ({total / n / 1024:.1f} KiB per sample on disk), "
              f"{len(c.shards)} shards, {total / 2**20:.0f} MiB")

    def drop_caches() -> bool:
        try:
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return True
        except OSError:
            return False

    def timed_cat(c) -> float:
        t0 = time.perf_counter()
        # an argument list: no shell ever parses the --dir path
        subprocess.run(["cat", "--", *c.shard_paths()], stdout=subprocess.DEVNULL, check=True)
        return n / (time.perf_counter() - t0)

    def timed_reader(c, w: int, backend: str, kind: str) -> float:
        stream = CorpusStream(c, args.batch, resampled=False, shuffle_buffer=args.shuffle_buffer,
                              drop_last=False, backend=backend)
        t0 = time.perf_counter()
        seen = sum(b["x"].shape[0] for b in make_loader(stream, num_workers=w, kind=kind))
        assert seen == n, (seen, n)
        return seen / (time.perf_counter() - t0)

    cold_ok = not args.no_cold and drop_caches()
    modes = ([("cold", True)] if cold_ok else []) + [("warm", False)]
    runs = [("indexed", w, k) for w in args.workers for k in (("thread", "process") if w else ("in-process",))]
    runs.append(("webdataset", 0, "in-process"))
    per_core = {}
    for mode, cold in modes:
        if not cold:  # both corpora into the page cache
            timed_cat(corpora[1]), timed_cat(corpora[2])
        cat_rate = timed_cat(corpora[1])
        print(f"[{mode} page cache] cat of the format-1 shards: {cat_rate:,.0f} samples/s")
        for backend, w, kind in runs:
            rates: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(args.repeat):
                for v in (1, 2):  # back to back, so both see the same machine
                    if cold:
                        drop_caches()
                    rates[v].append(timed_reader(corpora[v], w, backend, "thread" if kind == "thread" else "process"))
            r1, r2 = statistics.median(rates[1]), statistics.median(rates[2])
            if backend == "indexed" and w == 0:
                per_core[mode] = r2
            print(f"[{mode}] {backend:10s} workers={w} {kind:10s}: format 1 {r1:,.0f}, format 2 {r2:,.0f} samples/s; "
                  f"format 2 / format 1 = {r2 / r1:.2f} (target >= 1); format 2 / cat = {r2 / cat_rate:.2f} "
                  f"(runs: {', '.join(f'{x:,.0f}' for x in rates[2])})")
        if cold:
            drop_caches()
    need = 1.5 * GPU_RATE
    for mode, r in per_core.items():
        print(f"[{mode}] per core (format 2, in-process, one thread): {r:,.0f} samples/s = {r / GPU_RATE:.2f}x the "
              f"~{GPU_RATE // 1000}K samples/s one GPU trains on; 1.5x that needs {need / r:.2f} core(s) per GPU, "
              f"a 16-core host gives {16 * r / need:.1f}x the target for one GPU ({16 * r / GPU_RATE:.1f} GPUs' worth)")


if __name__ == "__main__":
    main()
