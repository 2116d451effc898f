"""`lsm convert`: checkpoints → weight corpus (manifest.json + shard-%06d.tar).

Stages, each restartable:
1. plan — from headers only (``plan.py``); written to ``plan.json``. A directory that holds a
   different plan or corpus is refused, or with ``overwrite=true`` the files that corpus' own
   plan / manifest name are removed (nothing else). A directory without a plan or manifest of
   ours that already holds names a conversion writes is refused: those files are not ours.
2. scan — every tensor of the shards still to write is read once and bit-tested before any
   shard is written (~6 GiB/s of bf16 per core): a NaN/Inf is an error naming the tensor.
   Locally all workers scan before any writes; a ``--worker`` (Slurm array task) scans its own
   share first.
3. shards — each worker writes its contiguous range of shards. Format 2: a block member is the
   tensor's raw bytes in its own dtype, written straight from the buffer read from the
   checkpoint (plus zero padding at the tensor's end); format 1: standardized float32 samples
   and their fixups. (mean, std) are computed on a helper thread while the tensor's blocks are
   written, sha256 on another while each buffer is written. Shards are fsynced and renamed into
   place; then ``parts/<shard>.json`` records sha256, size, member offsets and the stats of the
   tensors whose first block the shard holds (format 1: of every tensor it touches). A killed
   worker leaves at most temp files, which the re-run deletes; finished shards are skipped.
4. finalize — once every part exists, ``manifest.json`` is written (atomically, last), with a
   digest of its own content (``manifest_digest``). A corpus without a manifest is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import re
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lsm_dist.adapters import open_ref
from lsm_dist.checkpoint import DTYPES, Checkpoint
from lsm_dist.chunking import ChunkSpec, check_finite, chunk_range, norm_stats, raw_block
from lsm_dist.console import progress as console_progress
from lsm_dist.corpus.plan import ConvertConfig, make_plan, worker_shards
from lsm_dist.utils import atomic_open, atomic_write_json, get_logger, read_json, sha256_json

MANIFEST = "manifest.json"
PLAN = "plan.json"
PARTS = "parts"
FORMAT = "lsm_dist.corpus"


class CorpusError(ValueError):
    """A corpus directory is missing, incomplete, corrupt or belongs to another conversion."""


class _HashingWriter:
    """File wrapper that hashes and counts bytes as tarfile writes them. A large buffer is hashed
    on a helper thread while it is written (both release the GIL), and hashed before ``write``
    returns, so the caller may reuse it and the digest sees the bytes in order."""

    def __init__(self, f, hasher: ThreadPoolExecutor | None = None):
        self.f, self.h, self.n, self.hasher = f, hashlib.sha256(), 0, hasher

    def write(self, b) -> int:
        self.n += len(b)
        if self.hasher is None or len(b) < 1 << 20:
            self.h.update(b)
            return self.f.write(b)
        done = self.hasher.submit(self.h.update, b)
        try:
            return self.f.write(b)
        finally:
            done.result()

    def tell(self) -> int:
        return self.n


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact .npy (format 1.0) header numpy writes for a C-order array of dtype and shape."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                "fortran_order": False, "shape": tuple(shape)})
    return head.getvalue()


def _npy_parts(arr: np.ndarray, shape: tuple[int, ...] | None = None, pad: int = 0) -> list:
    """An .npy member as buffers written as they are: [header, data, zero padding]. ``arr`` is
    the flat data (its buffer is written, no copy), ``pad`` zero elements complete ``shape``."""
    arr = np.ascontiguousarray(arr)
    shape = arr.shape if shape is None else shape
    parts = [npy_header(arr.dtype, shape), memoryview(arr.reshape(-1).view(np.uint8))]
    if pad:
        parts.append(bytes(pad * arr.dtype.itemsize))
    return parts


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


def member_key(tindex: int, start: int) -> str:
    """Member name stem of the block of tensor ``tindex`` starting at sample ``start``."""
    return f"t{tindex:07d}_s{start:09d}"


class _TensorCache:
    """Keeps the current source tensor (and its stats, once asked for) while its blocks are
    scanned or written. With a ``pool`` the stats are computed on a helper thread while the
    blocks are written; the tensor's buffer is reused only once they are done."""

    def __init__(self, plan: dict, pool: ThreadPoolExecutor | None = None):
        self.plan, self.pool = plan, pool
        self.paths = {m["id"]: m["path"] for m in plan["models"]}
        self.ckpts: dict[str, Checkpoint] = {}
        self.base = Checkpoint(plan["delta"]["base"]) if plan.get("delta") else None
        self.base_std: float | None = None
        self.key: int | None = None
        self.tensor: torch.Tensor | None = None
        self._stats: Future | None = None
        self.buf = bytearray()  # reused: one tensor's bytes, without fresh pages for every tensor

    def where(self, index: int) -> str:
        t = self.plan["tensors"][index]
        return f"{self.paths[t['model']]}: tensor {t['name']}"

    def get(self, index: int) -> torch.Tensor:
        if self.key != index:
            if self._stats is not None:
                self._stats.result()  # still reading the buffer that is about to be reused
            t = self.plan["tensors"][index]
            ck = self.ckpts.get(t["model"])
            if ck is None:
                ck = self.ckpts[t["model"]] = open_ref(self.paths[t["model"]])
            self.key, self.tensor, self._stats = None, None, None  # the tensor is a view of the buffer
            if self.base is not None:  # a delta corpus: the task vector, and the base's std
                from lsm_dist.delta import task_vector

                b = self.base.read(t["name"])
                self.base_std = norm_stats(b)[1]
                x = task_vector(ck, self.base, t["name"])
                del b
            else:
                nbytes = ck.tensors[t["name"]].nbytes if t["name"] in ck.tensors else 0
                if len(self.buf) < nbytes:
                    self.buf = bytearray(nbytes)
                x = ck.read(t["name"], self.buf)
            if list(x.shape) != t["shape"] or x.dtype != DTYPES[t["dtype"]]:
                raise CorpusError(f"{ck.path}: tensor {t['name']} changed since planning ({tuple(x.shape)}, {x.dtype})")
            self.key, self.tensor = index, x
        return self.tensor

    def stats(self, index: int) -> Future:
        """(mean, std) of tensor ``index`` (read if it is not the current one), as a future."""
        x = self.get(index)
        if self._stats is None:  # finite: scanned before any shard was written
            if self.pool is not None:
                self._stats = self.pool.submit(norm_stats, x)
            else:
                self._stats = Future()
                self._stats.set_result(norm_stats(x))
        return self._stats


def scan_shards(plan: dict, shard_ids, progress: bool = False, desc: str = "scan") -> None:
    """Read every tensor the shards touch once; a NaN/Inf is a :class:`NonFiniteError` naming
    the checkpoint and tensor (before anything is written)."""
    touched = sorted({b[0] for i in shard_ids for b in plan["shards"][i]["blocks"]})
    cache = _TensorCache(plan)
    it = touched
    if progress and touched:
        from tqdm import tqdm

        it = tqdm(touched, desc=desc, unit="tensor")
    for ti in it:
        check_finite(cache.get(ti), cache.where(ti))


def write_shard(out: Path, plan: dict, shard_idx: int, cache: _TensorCache,
                hasher: ThreadPoolExecutor | None = None) -> dict:
    shard = plan["shards"][shard_idx]
    spec = ChunkSpec(plan["settings"]["tokens"], plan["settings"]["chunk"])
    v1 = plan["format_version"] == 1
    members, tstats, pending, pending_base = [], {}, {}, {}
    with atomic_open(out / shard["name"], "wb") as f:
        hw = _HashingWriter(f, hasher)
        with tarfile.open(fileobj=hw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for tindex, start, n in shard["blocks"]:
                t = plan["tensors"][tindex]
                x = cache.get(tindex)
                key = member_key(tindex, start)
                meta = {
                    "tensor": tindex, "model": t["model"], "name": t["name"], "layer": t["layer"],
                    "block": t["block"], "role": t["role"], "start": start, "count": n,
                    "first_sample": t["first_sample"] + start,
                }
                shape = (n, spec.tokens, spec.chunk)
                if v1:
                    mean, std = cache.stats(tindex).result()
                    samples, fix = chunk_range(x, spec, mean, std, start, n)
                    off_json, _ = _add_member(tar, key + ".json", [json.dumps(meta, sort_keys=True).encode()])
                    off_npy, len_npy = _add_member(tar, key + ".npy", _npy_parts(samples))
                    off_fix, len_fix = _add_member(tar, key + ".fix.npy", _npy_parts(fix))
                    members.append([tindex, start, n, off_npy, len_npy, off_fix, len_fix, off_json])
                    st = tstats.setdefault(str(tindex), {"mean": mean, "std": std, "fixups": 0})
                    st["fixups"] += int(fix.shape[1])
                    continue
                if start == 0:  # the shard holding a tensor's first block records its stats,
                    pending[str(tindex)] = cache.stats(tindex)  # computed while its blocks are written
                    if cache.base is not None:
                        pending_base[str(tindex)] = {"base_std": cache.base_std}
                meta |= {"shape": t["shape"], "dtype": t["dtype"], "stored_dtype": t["stored_dtype"]}
                raw, pad = raw_block(x, spec, start, n)
                off_json, len_json = _add_member(tar, key + ".json", [json.dumps(meta, sort_keys=True).encode()])
                off_npy, len_npy = _add_member(tar, key + ".npy", _npy_parts(raw, shape, pad))
                members.append([tindex, start, n, off_npy, len_npy, off_json, len_json])
    for k, f in pending.items():
        mean, std = f.result()
        tstats[k] = {"mean": mean, "std": std, **pending_base.get(k, {})}
    return {
        "name": shard["name"],
        "plan_digest": plan["plan_digest"],
        "sha256": hw.h.hexdigest(),
        "bytes": hw.n,
        "num_samples": shard["num_samples"],
        "members": members,
        "tensor_stats": tstats,
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


def _remove_temps(folder: Path, names) -> None:
    """Delete the temp files ``utils.atomic_open`` leaves for ``names`` in ``folder`` when a run is
    killed (``.<name>.<8 random chars>.tmp``), and nothing else."""
    if not folder.is_dir():
        return
    pats = [re.compile(rf"\.{re.escape(n)}\.[a-z0-9_]{{8}}\.tmp") for n in names]
    for p in folder.iterdir():
        if p.name.endswith(".tmp") and any(r.fullmatch(p.name) for r in pats) and p.is_file():
            p.unlink(missing_ok=True)


def worker_todo(out_dir: str | Path, worker: int, num_workers: int) -> list[int]:
    """This worker's shards still to write (after removing its temp files of killed runs)."""
    out = Path(out_dir)
    plan = read_json(out / PLAN)
    mine = worker_shards(len(plan["shards"]), worker, num_workers)
    names = [plan["shards"][i]["name"] for i in mine]
    _remove_temps(out, names)
    _remove_temps(out / PARTS, [n + ".json" for n in names])
    return [i for i in mine if not shard_done(out, plan, i)]


def run_worker(out_dir: str | Path, worker: int, num_workers: int, on_shard=None,
               scanned: bool = False) -> int:
    """Write this worker's unfinished shards (scanning their tensors first unless ``scanned``);
    ``on_shard()`` after each one. Returns the number written."""
    out = Path(out_dir)
    plan = read_json(out / PLAN)
    todo = worker_todo(out, worker, num_workers)
    if not scanned:
        scan_shards(plan, todo)
    # helper threads: sha256 of the buffer being written, stats of the tensor being written
    with ThreadPoolExecutor(1, thread_name_prefix="lsm-sha256") as hasher, \
            ThreadPoolExecutor(1, thread_name_prefix="lsm-stats") as stats:
        cache = _TensorCache(plan, stats)
        for i in todo:
            info = write_shard(out, plan, i, cache, hasher)
            atomic_write_json(_part_path(out, info["name"]), info)
            if on_shard is not None:
                on_shard()
    return len(todo)


def manifest_digest(manifest: dict) -> str:
    """Digest of a manifest's content: everything but the digest itself and where the source
    checkpoints live (a moved checkpoint's path may be edited)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_digest"}
    body["models"] = [{k: v for k, v in m.items() if k != "path"} for m in manifest.get("models", [])]
    return sha256_json(body)[:16]


def finalize(out_dir: str | Path) -> dict:
    """All parts present → manifest.json (the only file that marks a corpus complete)."""
    out = Path(out_dir)
    plan = read_json(out / PLAN)
    missing = [s["name"] for i, s in enumerate(plan["shards"]) if not shard_done(out, plan, i)]
    if missing:
        raise CorpusError(f"{out}: {len(missing)} shard(s) not written yet, e.g. {missing[:3]}; re-run convert")
    v1 = plan["format_version"] == 1
    tensors = [dict(t) for t in plan["tensors"]]
    for t in tensors:
        t["locations"] = []
        if v1:
            t["fixups"] = 0
    shards = []
    for si, s in enumerate(plan["shards"]):
        part = read_json(_part_path(out, s["name"]))
        for tindex, st in part["tensor_stats"].items():
            t = tensors[int(tindex)]
            if "mean" in t and (t["mean"], t["std"]) != (st["mean"], st["std"]):
                raise CorpusError(f"{out}: workers disagree on normalization of {t['name']}")
            t["mean"], t["std"] = st["mean"], st["std"]
            if "base_std" in st:
                t["base_std"] = st["base_std"]
            if v1:
                t["fixups"] += st["fixups"]
        for m in part["members"]:
            tensors[m[0]]["locations"].append([si, *m[1:7]])
        shards.append({k: part[k] for k in ("name", "num_samples", "bytes", "sha256")})
    lacking = [t["name"] for t in tensors if "mean" not in t]
    if lacking:
        raise CorpusError(f"{out}: no shard part records the normalization of {lacking[:3]}; re-run convert")
    manifest = {k: v for k, v in plan.items() if k not in ("tensors", "shards")}
    manifest.update(tensors=tensors, shards=shards, total_bytes=sum(s["bytes"] for s in shards))
    if "delta" in manifest:
        from lsm_dist.delta import delta_gain

        manifest["delta"] = {**manifest["delta"], "gain": delta_gain(tensors)}
    manifest["manifest_digest"] = manifest_digest(manifest)
    _remove_temps(out, [MANIFEST, PLAN])
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _own_record(p: Path) -> dict | None:
    """A plan / manifest this project wrote, or None when ``p`` does not exist; a file by that
    name that is not ours is an error (nothing it might list can be proven ours)."""
    if not p.is_file():
        return None
    try:
        rec = read_json(p)
    except ValueError as e:
        raise CorpusError(f"{e}: not a plan or manifest a conversion wrote; choose another out_dir "
                          "(its files are never removed)") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or not isinstance(rec.get("shards"), list):
        raise CorpusError(f"{p}: not a plan or manifest a conversion wrote; choose another out_dir "
                          "(its files are never removed)")
    return rec


def prepare(cfg: ConvertConfig) -> dict:
    """Make the plan and claim the output directory (refusing one that holds another corpus,
    or files a conversion would write that no conversion of ours wrote)."""
    out = Path(cfg.out_dir)
    plan = make_plan(cfg)
    records = [(f, r) for f in (MANIFEST, PLAN) if (r := _own_record(out / f)) is not None]
    others = [(f, r) for f, r in records if r.get("plan_digest") != plan["plan_digest"]]
    if others:
        f, r = others[0]
        if not cfg.overwrite:
            raise CorpusError(
                f"{out} already holds a different corpus ({f} digest {r.get('plan_digest')}, this conversion "
                f"{plan['plan_digest']}); choose another out_dir or set overwrite=true"
            )
        clear_corpus(out, [r for _, r in records])
    elif not records and out.is_dir():
        clash = [s["name"] for s in plan["shards"] if (out / s["name"]).exists()]
        clash += [PARTS] if (out / PARTS).exists() else []
        if clash and not (out / PLAN).is_file():  # (a concurrent array task may just have claimed it)
            raise CorpusError(f"{out}: holds {clash[:3]} but no plan or manifest of a conversion: these are not "
                              "files a conversion wrote and are never overwritten; choose another out_dir")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / PLAN).is_file():
        atomic_write_json(out / PLAN, plan)
    return plan


def clear_corpus(out: Path, records: list[dict]) -> None:
    """Remove the files of the corpora ``records`` (their plan / manifest) name: manifest, plan,
    their shards and shard parts, and the temp files a killed run left for them. Nothing else;
    ``parts/`` goes only once it is empty."""
    names = sorted({s["name"] for r in records for s in r["shards"] if isinstance(s.get("name"), str)
                    and re.fullmatch(r"shard-\d{6}\.tar", s["name"])})
    for n in names:
        (out / n).unlink(missing_ok=True)
        _part_path(out, n).unlink(missing_ok=True)
    _remove_temps(out, names)
    _remove_temps(out / PARTS, [n + ".json" for n in names])
    for f in (MANIFEST, PLAN):
        (out / f).unlink(missing_ok=True)
    _remove_temps(out, [MANIFEST, PLAN])
    with contextlib.suppress(OSError):  # absent, or holds files this corpus did not name
        (out / PARTS).rmdir()


def _scan_entry(out_dir: str, worker: int, num_workers: int) -> None:
    torch.set_num_threads(1)
    plan = read_json(Path(out_dir) / PLAN)
    scan_shards(plan, worker_todo(out_dir, worker, num_workers))


def _worker_entry(out_dir: str, worker: int, num_workers: int) -> int:
    torch.set_num_threads(1)
    return run_worker(out_dir, worker, num_workers, scanned=True)  # no bar here: the parent shows one


def run_convert(cfg: ConvertConfig, progress: bool = True) -> dict:
    """Plan, scan every tensor, write all shards with ``cfg.num_workers`` local processes,
    finalize. ``progress``: one console bar over the shards (the parent counts the workers'
    finished parts)."""
    log = get_logger()
    out = Path(cfg.out_dir)
    plan = prepare(cfg)
    if (out / MANIFEST).is_file() and read_json(out / MANIFEST).get("plan_digest") == plan["plan_digest"]:
        log.info("corpus %s is complete already (digest %s)", out, plan["plan_digest"])
        return read_json(out / MANIFEST)
    _remove_temps(out, [MANIFEST, PLAN])
    n = min(cfg.num_workers, max(len(plan["shards"]), 1))
    log.info("converting %d tensors of %d model(s) into %d shards (format %d) with %d worker(s)",
             len(plan["tensors"]), len(plan["models"]), len(plan["shards"]), plan["format_version"], n)
    done = sum(shard_done(out, plan, i) for i in range(len(plan["shards"])))
    bar = console_progress(total=len(plan["shards"]), initial=done, desc="convert", unit="shard",
                           disable=not progress)
    try:
        if n == 1:
            run_worker(out, 0, 1, bar.update)
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(n) as pool:  # every worker scans before any writes
                for r in [pool.apply_async(_scan_entry, (str(out), w, n)) for w in range(n)]:
                    r.get()
                res = [pool.apply_async(_worker_entry, (str(out), w, n)) for w in range(n)]
                for r in res:
                    while not r.ready():
                        r.wait(0.5)
                        parts = len(list((out / PARTS).glob("*.json"))) if (out / PARTS).is_dir() else 0
                        bar.update(max(0, parts - bar.n))
                    r.get()
                pool.close()  # let the workers exit on their own
                pool.join()
            bar.update(max(0, len(plan["shards"]) - bar.n))
    finally:
        bar.close()
    return finalize(out)
