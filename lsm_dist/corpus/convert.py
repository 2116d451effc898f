"""`lsm convert`: checkpoints → weight corpus (manifest.json + shard-%06d.tar).

Stages, each restartable:
1. plan  — from headers only (``plan.py``); written to ``plan.json``. A directory that holds a
   different plan or corpus is refused (or replaced with ``overwrite=true``).
2. shards — each worker writes its contiguous range of shards. A shard is streamed tensor by
   tensor (memory: one source tensor + one block), hashed while it is written, fsynced and
   renamed into place; then ``parts/<shard>.json`` records its sha256, size, member offsets and
   the normalization stats of the tensors it touched. A killed worker leaves at most a temp
   file, which the re-run deletes; finished shards are skipped.
3. finalize — once every part exists, ``manifest.json`` is written (atomically, last). A corpus
   without a manifest is never read.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch

from lsm_dist.checkpoint import DTYPES, Checkpoint
from lsm_dist.chunking import ChunkSpec, NonFiniteError, chunk_range, norm_stats
from lsm_dist.console import progress as console_progress
from lsm_dist.corpus.plan import ConvertConfig, make_plan, worker_shards
from lsm_dist.utils import atomic_open, atomic_write_json, get_logger, read_json

MANIFEST = "manifest.json"
PLAN = "plan.json"
PARTS = "parts"


class CorpusError(ValueError):
    """A corpus directory is missing, incomplete, corrupt or belongs to another conversion."""


class _HashingWriter:
    """File wrapper that hashes and counts bytes as tarfile writes them."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n


def _npy_parts(arr: np.ndarray) -> list:
    """An .npy file as [header bytes, array buffer] (no copy of the data)."""
    arr = np.ascontiguousarray(arr)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    return [head.getvalue(), memoryview(arr.reshape(-1).view(np.uint8))]


def _add_member(tar: tarfile.TarFile, name: str, parts: list) -> tuple[int, int]:
    """Append a member with fixed metadata (deterministic bytes) from buffers written as-is.

    Returns (data offset, data length) for random access.
    """
    size = sum(len(p) for p in parts)
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    head = ti.tobuf(tar.format, tar.encoding, tar.errors)
    tar.fileobj.write(head)
    offset = tar.offset + len(head)
    for p in parts:
        tar.fileobj.write(p)
    pad = -size % tarfile.BLOCKSIZE
    if pad:
        tar.fileobj.write(b"\0" * pad)
    tar.offset = offset + size + pad
    return offset, size


class _TensorCache:
    """Keeps the current source tensor (and its stats) while its blocks are written."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.paths = {m["id"]: m["path"] for m in plan["models"]}
        self.ckpts: dict[str, Checkpoint] = {}
        self.key: int | None = None
        self.tensor: torch.Tensor | None = None
        self.stats: tuple[float, float] = (0.0, 1.0)

    def get(self, index: int) -> tuple[torch.Tensor, float, float]:
        if self.key != index:
            t = self.plan["tensors"][index]
            ck = self.ckpts.get(t["model"])
            if ck is None:
                ck = self.ckpts[t["model"]] = Checkpoint(self.paths[t["model"]])
            self.tensor = None  # free the previous tensor before reading the next
            x = ck.read(t["name"])
            if list(x.shape) != t["shape"] or x.dtype != DTYPES[t["dtype"]]:
                raise CorpusError(f"{ck.path}: tensor {t['name']} changed since planning ({tuple(x.shape)}, {x.dtype})")
            try:
                stats = norm_stats(x)
            except NonFiniteError as e:
                raise NonFiniteError(x, f"{ck.path}: tensor {t['name']}") from e
            self.key, self.tensor, self.stats = index, x, stats
        return self.tensor, *self.stats


def write_shard(out: Path, plan: dict, shard_idx: int, cache: _TensorCache) -> dict:
    shard = plan["shards"][shard_idx]
    spec = ChunkSpec(plan["settings"]["tokens"], plan["settings"]["chunk"])
    members, stats = [], {}
    with atomic_open(out / shard["name"], "wb") as f:
        hw = _HashingWriter(f)
        with tarfile.open(fileobj=hw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for tindex, start, n in shard["blocks"]:
                t = plan["tensors"][tindex]
                x, mean, std = cache.get(tindex)
                samples, fix = chunk_range(x, spec, mean, std, start, n)
                key = f"t{tindex:07d}_s{start:09d}"
                meta = {
                    "tensor": tindex, "model": t["model"], "name": t["name"], "layer": t["layer"],
                    "block": t["block"], "role": t["role"], "start": start, "count": n,
                    "first_sample": t["first_sample"] + start,
                }
                off_json, _ = _add_member(tar, key + ".json", [json.dumps(meta, sort_keys=True).encode()])
                off_npy, len_npy = _add_member(tar, key + ".npy", _npy_parts(samples))
                off_fix, len_fix = _add_member(tar, key + ".fix.npy", _npy_parts(fix))
                members.append([tindex, start, n, off_npy, len_npy, off_fix, len_fix, off_json])
                st = stats.setdefault(str(tindex), {"mean": mean, "std": std, "fixups": 0})
                st["fixups"] += int(fix.shape[1])
    return {
        "name": shard["name"],
        "plan_digest": plan["plan_digest"],
        "sha256": hw.h.hexdigest(),
        "bytes": hw.n,
        "num_samples": shard["num_samples"],
        "members": members,
        "tensor_stats": stats,
    }


def _part_path(out: Path, shard_name: str) -> Path:
    return out / PARTS / (shard_name + ".json")


def shard_done(out: Path, plan: dict, shard_idx: int) -> bool:
    name = plan["shards"][shard_idx]["name"]
    part = _part_path(out, name)
    if not part.is_file() or not (out / name).is_file():
        return False
    try:
        info = read_json(part)
    except ValueError:
        return False
    return info.get("plan_digest") == plan["plan_digest"] and (out / name).stat().st_size == info.get("bytes")


def run_worker(out_dir: str | Path, worker: int, num_workers: int, on_shard=None) -> int:
    """Write this worker's shards (skipping finished ones); ``on_shard()`` after each one.
    Returns the number written."""
    out = Path(out_dir)
    plan = read_json(out / PLAN)
    mine = worker_shards(len(plan["shards"]), worker, num_workers)
    names = {plan["shards"][i]["name"] for i in mine}
    for stale in out.glob(".shard-*.tmp"):  # temp files of a killed run
        if any(stale.name.startswith(f".{n}.") for n in names):
            stale.unlink(missing_ok=True)
    cache = _TensorCache(plan)
    todo = [i for i in mine if not shard_done(out, plan, i)]
    for i in todo:
        info = write_shard(out, plan, i, cache)
        atomic_write_json(_part_path(out, info["name"]), info)
        if on_shard is not None:
            on_shard()
    return len(todo)


def finalize(out_dir: str | Path) -> dict:
    """All parts present → manifest.json (the only file that marks a corpus complete)."""
    out = Path(out_dir)
    plan = read_json(out / PLAN)
    missing = [s["name"] for i, s in enumerate(plan["shards"]) if not shard_done(out, plan, i)]
    if missing:
        raise CorpusError(f"{out}: {len(missing)} shard(s) not written yet, e.g. {missing[:3]}; re-run convert")
    tensors = [dict(t) for t in plan["tensors"]]
    for t in tensors:
        t["locations"] = []
        t["fixups"] = 0
    shards = []
    for si, s in enumerate(plan["shards"]):
        part = read_json(_part_path(out, s["name"]))
        for tindex, st in part["tensor_stats"].items():
            t = tensors[int(tindex)]
            if "mean" in t and (t["mean"], t["std"]) != (st["mean"], st["std"]):
                raise CorpusError(f"{out}: workers disagree on normalization of {t['name']}")
            t["mean"], t["std"] = st["mean"], st["std"]
            t["fixups"] += st["fixups"]
        for tindex, start, n, off_npy, len_npy, off_fix, len_fix, _ in part["members"]:
            tensors[tindex]["locations"].append([si, start, n, off_npy, len_npy, off_fix, len_fix])
        shards.append({k: part[k] for k in ("name", "num_samples", "bytes", "sha256")})
    manifest = {k: v for k, v in plan.items() if k not in ("tensors", "shards")}
    manifest.update(tensors=tensors, shards=shards, total_bytes=sum(s["bytes"] for s in shards))
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def prepare(cfg: ConvertConfig) -> dict:
    """Make the plan and claim the output directory (refusing one that holds another corpus)."""
    out = Path(cfg.out_dir)
    plan = make_plan(cfg)
    for fname in (MANIFEST, PLAN):
        p = out / fname
        if p.is_file():
            try:
                other = read_json(p).get("plan_digest")
            except ValueError:
                other = "<unreadable>"
            if other != plan["plan_digest"]:
                if not cfg.overwrite:
                    raise CorpusError(
                        f"{out} already holds a different corpus ({fname} digest {other}, this conversion "
                        f"{plan['plan_digest']}); choose another out_dir or set overwrite=true"
                    )
                clear_corpus(out)
                break
    out.mkdir(parents=True, exist_ok=True)
    if not (out / PLAN).is_file():
        atomic_write_json(out / PLAN, plan)
    return plan


def clear_corpus(out: Path) -> None:
    """Remove the files a conversion writes (and nothing else)."""
    for p in [out / MANIFEST, out / PLAN, *out.glob("shard-*.tar"), *out.glob(".shard-*.tmp")]:
        p.unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)


def _worker_entry(out_dir: str, worker: int, num_workers: int) -> int:
    torch.set_num_threads(1)
    return run_worker(out_dir, worker, num_workers)  # no bar here: the parent shows one


def run_convert(cfg: ConvertConfig, progress: bool = True) -> dict:
    """Plan, write all shards with ``cfg.num_workers`` local processes, finalize. ``progress``:
    one console bar over the shards (the parent counts the workers' finished parts)."""
    log = get_logger()
    out = Path(cfg.out_dir)
    plan = prepare(cfg)
    if (out / MANIFEST).is_file() and read_json(out / MANIFEST).get("plan_digest") == plan["plan_digest"]:
        log.info("corpus %s is complete already (digest %s)", out, plan["plan_digest"])
        return read_json(out / MANIFEST)
    n = min(cfg.num_workers, max(len(plan["shards"]), 1))
    log.info("converting %d tensors of %d model(s) into %d shards with %d worker(s)",
             len(plan["tensors"]), len(plan["models"]), len(plan["shards"]), n)
    done = sum(shard_done(out, plan, i) for i in range(len(plan["shards"])))
    bar = console_progress(total=len(plan["shards"]), initial=done, desc="convert", unit="shard",
                           disable=not progress)
    try:
        if n == 1:
            run_worker(out, 0, 1, bar.update)
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(n) as pool:
                res = [pool.apply_async(_worker_entry, (str(out), w, n)) for w in range(n)]
                for r in res:
                    while not r.ready():
                        r.wait(0.5)
                        parts = len(list((out / PARTS).glob("*.json"))) if (out / PARTS).is_dir() else 0
                        bar.update(max(0, parts - bar.n))
                    r.get()
            bar.update(max(0, len(plan["shards"]) - bar.n))
    finally:
        bar.close()
    return finalize(out)
