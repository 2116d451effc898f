"""Reading a weight corpus: random access by tensor, and a resumable streaming dataset.

``Corpus`` loads and checks ``manifest.json`` (shards present with the recorded sizes;
``verify()`` also checks sha256) and rebuilds any tensor exactly from the byte offsets the
manifest records. ``CorpusStream`` is the training reader, built on webdataset's tar parsing:
shards are split by rank and by DataLoader worker (or resampled independently per worker),
samples pass through a seeded shuffle buffer and are batched with ``np.stack`` into
``(batch, tokens, chunk)`` tensors with per-sample metadata. Its position is the number of
batches the trainer consumed: every stream is a pure function of (seed, rank, worker), so a
resumed stream skips exactly the batches already seen.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from lsm_dist.checkpoint import DTYPES
from lsm_dist.chunking import unchunk
from lsm_dist.corpus.convert import MANIFEST, CorpusError
from lsm_dist.corpus.plan import BLOCK_IDS, FORMAT_VERSION
from lsm_dist.utils import read_json, sha256_file


def _seed(*parts) -> int:
    """Stable seed from parts (Python's hash() of str differs between processes)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:16], 16)


def _load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise CorpusError(f"{what}: corrupt array member: {e}") from None


class Corpus:
    """A finished corpus directory."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise CorpusError(f"{self.path}: corpus directory does not exist")
        if not mpath.is_file():
            hint = " (a conversion started here but did not finish: re-run lsm convert)" if (self.path / "plan.json").is_file() else ""
            raise CorpusError(f"{self.path}: no {MANIFEST}, not a finished corpus{hint}")
        try:
            self.manifest = read_json(mpath)
        except ValueError as e:
            raise CorpusError(str(e)) from None
        if self.manifest.get("format") != "lsm_dist.corpus" or self.manifest.get("format_version") != FORMAT_VERSION:
            raise CorpusError(f"{mpath}: not an lsm_dist corpus manifest of format version {FORMAT_VERSION}")
        for s in self.shards:
            p = self.path / s["name"]
            if not p.is_file():
                raise CorpusError(f"{p}: shard listed in the manifest is missing")
            if p.stat().st_size != s["bytes"]:
                raise CorpusError(f"{p}: truncated or wrong shard: {p.stat().st_size} bytes, manifest says {s['bytes']}")
        if verify:
            self.verify()

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def tensors(self) -> list[dict]:
        return self.manifest["tensors"]

    @property
    def tokens(self) -> int:
        return self.manifest["settings"]["tokens"]

    @property
    def chunk(self) -> int:
        return self.manifest["settings"]["chunk"]

    @property
    def num_samples(self) -> int:
        return self.manifest["num_samples"]

    def shard_paths(self) -> list[str]:
        return [str(self.path / s["name"]) for s in self.shards]

    def verify(self, names: list[str] | None = None) -> None:
        """Check sha256 of every shard (or of ``names``) against the manifest."""
        for s in self.shards:
            if names is not None and s["name"] not in names:
                continue
            p = self.path / s["name"]
            digest = sha256_file(p)
            if digest != s["sha256"]:
                raise CorpusError(f"{p}: checksum mismatch: sha256 {digest[:16]}…, manifest says {s['sha256'][:16]}…")

    def find(self, model: str, name: str) -> dict:
        for t in self.tensors:
            if t["model"] == model and t["name"] == name:
                return t
        raise KeyError(f"{self.path}: no tensor {name!r} of model {model!r}")

    def read_samples(self, t: dict) -> tuple[np.ndarray, np.ndarray]:
        """All samples of tensor entry ``t`` (n, tokens, chunk) and its fixups, by offset."""
        parts, fixes = [], []
        for si, _start, _n, off_npy, len_npy, off_fix, len_fix in t["locations"]:
            p = self.path / self.shards[si]["name"]
            with open(p, "rb") as f:
                f.seek(off_npy)
                parts.append(_load_npy(f.read(len_npy), str(p)))
                f.seek(off_fix)
                fixes.append(_load_npy(f.read(len_fix), str(p)))
        return np.concatenate(parts), np.concatenate(fixes, axis=1)

    def rebuild(self, t: dict) -> torch.Tensor:
        """The original tensor, bit-exact, in its original dtype."""
        samples, fix = self.read_samples(t)
        return unchunk(samples, t["shape"], DTYPES[t["dtype"]], t["mean"], t["std"], fix)

    def summary(self) -> str:
        m = self.manifest
        by_block: dict[str, list[int]] = {}
        for t in m["tensors"]:
            agg = by_block.setdefault(t["block"], [0, 0, 0])
            agg[0] += 1
            agg[1] += t["num_samples"]
            agg[2] += t["fixups"]
        lines = [
            f"corpus {self.path}  (digest {m['plan_digest']}, format v{m['format_version']})",
            f"  sample = {self.tokens} tokens x {self.chunk} values, float32; "
            f"{m['num_samples']} samples in {len(m['shards'])} shard(s), {m['total_bytes'] / 2**20:.1f} MiB",
            "  models: " + ", ".join(f"{x['id']} ({x['model_type']}, {x['num_layers']} layers, {'/'.join(x['dtypes'])})" for x in m["models"]),
        ]
        for b, (n, s, fx) in sorted(by_block.items()):
            lines.append(f"  {b:5s}: {n:5d} tensors, {s:8d} samples, {fx} exactness fixups")
        return "\n".join(lines)


class CorpusStream(IterableDataset):
    """Streaming training reader over a corpus.

    ``rank``/``world_size`` come from the caller (who read them with ``lsm_dist.dist``).
    With ``resampled`` each (rank, worker) draws shards at random forever from its own seeded
    RNG (the training default: equal progress on every rank, exact resume). Without it, one
    pass over the shards split by rank then worker (``shards[g::G]``), shuffled per epoch.

    Two ways to get blocks out of a shard, same samples either way:
    ``backend="webdataset"`` parses the tar stream with webdataset (works on any stream, e.g.
    ``pipe:`` URLs from object stores); ``backend="indexed"`` (default for local files) reads
    each block with one seek + readinto at the offset the manifest records, which skips
    tarfile's 10 KiB-record parsing and is several times faster. Samples then pass through a
    vectorized shuffle buffer (random slots are emitted and refilled from the stream) and are
    gathered straight into the batch tensor (in shared memory inside DataLoader workers, so
    handing it to the trainer costs no extra copy).
    """

    def __init__(
        self,
        corpus: Corpus,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        resampled: bool = True,
        shuffle_buffer: int = 2048,
        epoch: int = 0,
        verify: bool = False,
        drop_last: bool = True,
        start_batches: int = 0,
        backend: str = "indexed",
    ):
        super().__init__()
        if backend not in ("indexed", "webdataset"):
            raise ValueError(f"backend {backend!r} is not one of ['indexed', 'webdataset']")
        self.paths = corpus.shard_paths()
        self.sha = {str(corpus.path / s["name"]): s["sha256"] for s in corpus.shards}
        self.tokens, self.chunk = corpus.tokens, corpus.chunk
        self.role_ids = {r: i for i, r in enumerate(corpus.manifest["roles"])}
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.resampled, self.shuffle_buffer, self.epoch = seed, resampled, shuffle_buffer, epoch
        self.verify, self.drop_last, self.start_batches, self.backend = verify, drop_last, start_batches, backend
        # per shard: blocks in file order, (offset, nbytes, count, meta row)
        self.index: list[list[tuple[int, int, int, tuple]]] = [[] for _ in self.paths]
        for t in corpus.tensors:
            for si, start, n, off, nbytes, _, _ in t["locations"]:
                self.index[si].append((off, nbytes, n, self._ids(t["index"], t["layer"], t["block"], t["role"], start)))
        for blocks in self.index:
            blocks.sort()

    def _ids(self, tensor: int, layer: int | None, block: str, role: str, start: int) -> tuple:
        return (tensor, -1 if layer is None else layer, BLOCK_IDS[block], self.role_ids.get(role, 0), start)

    # -- shard order -------------------------------------------------------------------
    def _shard_order(self, worker: int, nworkers: int) -> Iterator[int]:
        if self.resampled:
            rng = random.Random(_seed(self.seed, self.rank, worker, "resample"))
            while True:
                yield rng.randrange(len(self.paths))
        order = list(range(len(self.paths)))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        g, G = self.rank * nworkers + worker, self.world_size * nworkers
        yield from order[g::G]

    # -- blocks: (samples (n, T, C) float32, meta (n, 5) int64) ---------------------------
    def _check_sha(self, url: str) -> None:
        if self.verify:
            digest = sha256_file(url)
            if digest != self.sha[url]:
                raise CorpusError(f"{url}: checksum mismatch: sha256 {digest[:16]}…, manifest says {self.sha[url][:16]}…")

    def _meta(self, ids: tuple, n: int) -> np.ndarray:
        m = np.empty((n, 5), dtype=np.int64)
        m[:] = ids
        m[:, 4] += np.arange(n)
        return m

    def _blocks_indexed(self, si: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        url = self.paths[si]
        self._check_sha(url)
        per = self.tokens * self.chunk
        with open(url, "rb", buffering=0) as f:
            for off, nbytes, n, ids in self.index[si]:
                head = nbytes - n * per * 4
                arr = np.empty((n, self.tokens, self.chunk), dtype=np.float32)
                f.seek(off + head)
                got = f.readinto(memoryview(arr).cast("B"))
                if got != arr.nbytes:
                    raise CorpusError(f"{url}: corrupt or truncated tar shard: block at {off} has {got} of {arr.nbytes} bytes")
                yield arr, self._meta(ids, n)

    def _blocks_wds(self, si: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        url = self.paths[si]
        self._check_sha(url)
        try:
            for s in wds.tariterators.tarfile_samples([dict(url=url)]):
                if "npy" not in s or "json" not in s:
                    raise CorpusError(f"{url}: member group {s.get('__key__')} lacks .npy or .json")
                meta = json.loads(s["json"])
                arr = _load_npy(s["npy"], url)
                if arr.shape[1:] != (self.tokens, self.chunk) or arr.shape[0] != meta["count"]:
                    raise CorpusError(f"{url}: block {s['__key__']} has shape {arr.shape}, expected (n, {self.tokens}, {self.chunk})")
                ids = self._ids(meta["tensor"], meta["layer"], meta["block"], meta["role"], meta["start"])
                yield arr, self._meta(ids, arr.shape[0])
        except CorpusError:
            raise
        except Exception as e:
            raise CorpusError(f"{url}: corrupt or truncated tar shard: {e}") from None

    def _blocks(self, worker: int, nworkers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        read = self._blocks_indexed if self.backend == "indexed" else self._blocks_wds
        for si in self._shard_order(worker, nworkers):
            yield from read(si)

    # -- batches -----------------------------------------------------------------------
    def _batches(self, worker: int, nworkers: int, skip: int) -> Iterator[tuple[np.ndarray, np.ndarray] | None]:
        """Index batches (buffer, rows, meta); ``None`` for the first ``skip`` (no copy made)."""
        B, T, C = self.batch_size, self.tokens, self.chunk
        cap = max(self.shuffle_buffer, B)  # shuffle_buffer <= B: no shuffling, cap == B
        rng = np.random.default_rng(_seed(self.seed, self.rank, worker, self.epoch, "shuffle"))
        shuffle = self.shuffle_buffer > B
        buf = np.empty((cap, T, C), dtype=np.float32)
        meta = np.empty((cap, 5), dtype=np.int64)
        free = np.arange(cap)  # empty slots, filled in order
        blocks = self._blocks(worker, nworkers)
        cur, cur_meta, pos = None, None, 0
        done, emitted = False, 0
        while True:
            while len(free) and not done:  # refill the emptied slots from the stream
                if cur is None or pos == len(cur):
                    nxt = next(blocks, None)
                    if nxt is None:
                        done = True
                        break
                    (cur, cur_meta), pos = nxt, 0
                k = min(len(free), len(cur) - pos)
                slots, free = free[:k], free[k:]
                buf[slots] = cur[pos : pos + k]
                meta[slots] = cur_meta[pos : pos + k]
                pos += k
            valid = cap - len(free)
            if valid == 0 or (valid < B and (self.drop_last or not done)):
                return
            if len(free):  # stream ended: compact the live slots to the front, keep their order
                live = np.setdiff1d(np.arange(cap), free)
                buf[:valid], meta[:valid] = buf[live], meta[live]
                free = np.arange(valid, cap)
            n = min(B, valid)
            # without shuffling cap == B, so a batch is the whole buffer in stream order
            rows = np.sort(rng.choice(valid, n, replace=False)) if shuffle else np.arange(n)
            yield (None if emitted < skip else (buf, rows, meta))
            emitted += 1
            free = np.concatenate([rows, free]) if len(free) else rows
            if done and cap - len(free) == 0:
                return

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            return self.iter_worker(0, 1)
        return self.iter_worker(info.id, info.num_workers, shared=True)

    def iter_worker(self, loader_worker: int, nworkers: int, shared: bool = False) -> Iterator[dict]:
        """The batches loader worker ``loader_worker`` of ``nworkers`` delivers (a DataLoader
        process, a :class:`ThreadLoader` thread, or the whole stream for 0 of 1). ``shared``:
        batches go to shared memory (a DataLoader worker process hands them over)."""
        # Loaders hand out batches round-robin starting at their worker 0. Global batch b
        # belongs to logical stream b % W, so a loader resumed after B batches must start
        # with logical stream B % W: its worker i plays stream (i + B) % W, and stream w has
        # already delivered ceil((B - w) / W) batches.
        worker = (loader_worker + self.start_batches) % nworkers
        skip = max(0, (self.start_batches - worker + nworkers - 1) // nworkers)
        for item in self._batches(worker, nworkers, skip):
            if item is None:
                continue
            buf, rows, meta = item
            x = torch.empty((len(rows), self.tokens, self.chunk), dtype=torch.float32)
            if shared:
                x.share_memory_()  # the trainer process maps it; no copy on hand-over
            np.take(buf, rows, axis=0, out=x.numpy())
            m = torch.from_numpy(meta[rows])
            yield {"x": x, "tensor": m[:, 0], "layer": m[:, 1], "block": m[:, 2], "role": m[:, 3], "sample": m[:, 4]}


class ThreadLoader:
    """DataLoader's worker protocol with threads instead of processes: worker i runs
    ``stream.iter_worker(i, N)`` in a thread and batches are taken round-robin from workers
    0..N-1 (an exhausted worker is skipped), so the order, and resuming with ``start_batches``,
    are exactly those of ``DataLoader(stream, num_workers=N)``. File reads and numpy/torch copies
    release the GIL, so the threads overlap with each other and with the trainer; batches are
    handed over without shared memory or pickling. Each worker keeps up to ``prefetch`` batches
    ready."""

    _DONE = object()

    def __init__(self, stream: CorpusStream, num_workers: int, prefetch: int = 4):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.stream, self.num_workers, self.prefetch = stream, num_workers, max(1, prefetch)

    def __iter__(self) -> Iterator[dict]:
        import queue
        import threading

        stop = threading.Event()
        queues = [queue.Queue(self.prefetch) for _ in range(self.num_workers)]

        def put(q, item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work(i: int) -> None:
            try:
                for batch in self.stream.iter_worker(i, self.num_workers):
                    if not put(queues[i], batch):
                        return
                put(queues[i], self._DONE)
            except BaseException as e:  # re-raised in the consumer
                put(queues[i], e)

        threads = [threading.Thread(target=work, args=(i,), daemon=True, name=f"lsm-loader-{i}")
                   for i in range(self.num_workers)]
        for t in threads:
            t.start()
        try:
            live = list(range(self.num_workers))
            while live:
                for i in list(live):
                    item = queues[i].get()
                    if item is self._DONE:
                        live.remove(i)
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield item
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=5)


def make_loader(stream: CorpusStream, num_workers: int = 0, prefetch_factor: int = 4,
                kind: str = "process"):
    """Batches of ``stream`` formed by ``num_workers`` loader workers (0: in this process):
    ``kind="process"``: a DataLoader with worker processes (batch_size=None); ``"thread"``: a
    :class:`ThreadLoader`. Both deliver the same batches in the same order."""
    if kind not in ("process", "thread"):
        raise ValueError(f"loader kind {kind!r} is not one of ['process', 'thread']")
    if kind == "thread" and num_workers > 0:
        return ThreadLoader(stream, num_workers, prefetch_factor)
    kw = dict(persistent_workers=True, prefetch_factor=prefetch_factor) if num_workers > 0 else {}
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, **kw)
