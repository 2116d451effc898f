"""Streaming reader throughput vs `cat` of the same shards (same run).

    python benchmarks/bench_reader.py [--mb 1024] [--workers 0 2] [--batch 256]

Builds (or reuses, with --dir) a corpus with the paper's sample size (16 × 640 float32 =
40 KiB) from a synthetic bf16 checkpoint, then measures one pass of
  * baseline: `cat` of every shard to /dev/null (an argument list, no shell), as samples/s;
  * CorpusStream + DataLoader with N workers (0 = in the trainer process), as samples/s: the
    indexed backend (blocks read by manifest offset) and the webdataset backend (tar parsing),
    both through the shuffle buffer and batch gather.
Prints the ratio (target ≥ 0.5) and what ~30K samples/s per GPU needs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1024, help="corpus size in MiB (float32 samples)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers (0: in-process)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shuffle-buffer", type=int, default=1024)
    ap.add_argument("--dir", default=None, help="build / reuse the corpus here (default: a temp dir)")
    ap.add_argument("--warm-only", action="store_true",
                    help="skip the cold-page-cache pass (it drops the whole machine's page cache)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from bench_convert import make_checkpoint

    from lsm_dist.corpus import ConvertConfig, run_convert
    from lsm_dist.corpus.reader import Corpus, CorpusStream, make_loader

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_reader_"))
    corpus_dir = root / "corpus"
    if not (corpus_dir / "manifest.json").is_file():
        make_checkpoint(root / "ckpt", largest_mb=8, total_mb=args.mb / 2)
        run_convert(ConvertConfig(models=[str(root / "ckpt")], out_dir=str(corpus_dir), num_workers=2), progress=False)
    c = Corpus(corpus_dir)
    n, sample_bytes = c.num_samples, c.tokens * c.chunk * 4
    total = sum(s["bytes"] for s in c.shards)
    print(f"corpus: {n} samples of {c.tokens}x{c.chunk} float32 ({sample_bytes / 1024:.0f} KiB), "
          f"{len(c.shards)} shards, {total / 2**20:.0f} MiB")
    def drop_caches() -> bool:
        try:
            subprocess.run("sync", check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return True
        except OSError:
            return False

    shard_files = [str(corpus_dir / s["name"]) for s in c.shards]

    def timed_cat() -> float:  # an argument list: no shell ever parses the --dir path
        t0 = time.perf_counter()
        subprocess.run(["cat", "--", *shard_files], stdout=subprocess.DEVNULL, check=True)
        return n / (time.perf_counter() - t0)

    def timed_reader(w: int, backend: str, kind: str) -> float:
        stream = CorpusStream(c, args.batch, resampled=False, shuffle_buffer=args.shuffle_buffer,
                              drop_last=False, backend=backend)
        t0 = time.perf_counter()
        seen = sum(b["x"].shape[0] for b in make_loader(stream, num_workers=w, kind=kind))
        assert seen == n, (seen, n)
        return seen / (time.perf_counter() - t0)

    modes = [("cold", True)] if not args.warm_only and drop_caches() else []
    modes.append(("warm", False))
    for mode, cold in modes:
        if not cold:
            timed_cat()
        cat_rate = timed_cat()
        print(f"[{mode} page cache] cat: {cat_rate:,.0f} samples/s ({cat_rate * sample_bytes / 2**20:.0f} MiB/s)")
        runs = [(b, w, k) for b in ("indexed", "webdataset") for w in args.workers
                for k in (("process", "thread") if w else ("in-process",))]
        for backend, w, kind in runs:
            if cold:
                drop_caches()
            rate = timed_reader(w, backend, "thread" if kind == "thread" else "process")
            print(f"[{mode}] reader {backend:10s} workers={w} {kind:10s}: {rate:,.0f} samples/s "
                  f"({rate * sample_bytes / 2**20:.0f} MiB/s, incl. worker start); ratio vs cat {rate / cat_rate:.2f}")
        if cold:
            drop_caches()
    need = 30_000 * sample_bytes
    print(f"feeding 30K samples/s per GPU needs {need / 2**30:.2f} GiB/s of sample data per GPU; "
          "the reader scales with DataLoader workers (each parses its own shards), so the per-GPU worker count is "
          "ceil(30K / per-worker rate) given storage that delivers the bytes.")


if __name__ == "__main__":
    main()
