"""A finished corpus on disk: the manifest, checked before use, and random access by tensor.

``Corpus(path)`` reads ``manifest.json`` and checks it before anything else is read: format
version, the manifest's digest of its own content, and every tensor entry — stored dtype,
finite stats, numel / sample count / padding, blocks tiling the tensor, each block's byte size
= .npy header + count × tokens × chunk × itemsize, byte ranges inside the shard sizes and not
overlapping, shard names and sample counts. Every block read then checks the tar header in
front of it (member name, size, checksum) and the exact .npy header, so an edited manifest can
never turn other bytes (tar headers, another block) into samples. A failure is a
``CorpusError`` naming the shard and the tensor.

Format 2 blocks hold the tensor's own values in ``stored_dtype``; :meth:`Corpus.samples`
standardizes them on read (``chunking.standardize``: ``(x − mean) / std`` in one step, padding
exactly 0); :meth:`Corpus.rebuild` is the stored bytes themselves. Format 1 blocks hold
standardized float32 samples (read as they are) and fixups (applied by ``rebuild``).
"""

from __future__ import annotations

import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lsm_dist.checkpoint import DTYPES
from lsm_dist.chunking import STORED, as_tensor, standardize, unchunk
from lsm_dist.corpus.convert import (
    FORMAT,
    MANIFEST,
    PLAN,
    CorpusError,
    manifest_digest,
    member_key,
    npy_header,
)
from lsm_dist.corpus.plan import READ_VERSIONS
from lsm_dist.utils import read_json, sha256_file

SHARD_NAME = re.compile(r"shard-\d{6}\.tar")
V1_KIND = "F32N"  # format 1: float32 samples standardized at conversion (read as they are)
KINDS = (V1_KIND, *STORED)  # what a block can hold; index = kind code in the shuffle buffer
TAR_HEADER = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class Block:
    """One block member of a tensor, resolved and checked against the manifest."""

    shard: int
    tensor: int
    start: int  # first sample (within the tensor)
    count: int
    offset: int  # of the .npy member's data in the shard
    nbytes: int  # .npy member length (header + values)
    head: bytes  # the exact .npy header it must start with
    kind: str  # KINDS: V1_KIND or the stored dtype
    mean: float  # standardization applied on read (format 1: 0, 1)
    std: float
    constant: bool  # manifest std 0: allowed only if every value equals the mean (checked on read)
    valid: int  # values of the last sample that are the tensor's (the rest is padding)
    aux: tuple[int, int]  # (offset, length) of the .json member (format 2) or .fix.npy (format 1)

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(np.float32) if self.kind == V1_KIND else STORED[self.kind].numpy

    @property
    def name(self) -> str:
        return member_key(self.tensor, self.start) + ".npy"


def _num(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise CorpusError(f"{what} is {x!r}, not a finite number")
    return float(x)


def _int(x, what: str, lo: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise CorpusError(f"{what} is {x!r}, not an integer >= {lo}")
    return x


def convert_command(manifest: dict) -> str:
    """The one command that writes this corpus again in the current format (from its sources)."""
    models = ",".join(f"{m.get('id')}={m.get('path')}" for m in manifest.get("models", []))
    st = manifest.get("settings", {})
    keys = ("tokens", "chunk", "block_samples", "shard_samples", "blocks", "params")
    extra = " ".join(f"{k}={st[k]}".replace("'", "").replace(" ", "") for k in keys if k in st)
    return f"lsm convert models=[{models}] {extra} out_dir=NEW_DIR"


class Corpus:
    """A finished corpus directory (``verify=True``: also every shard's sha256)."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise CorpusError(f"{self.path}: corpus directory does not exist")
        if not mpath.is_file():
            hint = " (a conversion started here but did not finish: re-run lsm convert)" if (self.path / PLAN).is_file() else ""
            raise CorpusError(f"{self.path}: no {MANIFEST}, not a finished corpus{hint}")
        try:
            self.manifest = read_json(mpath)
        except ValueError as e:
            raise CorpusError(str(e)) from None
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise CorpusError(f"{mpath}: not an lsm_dist corpus manifest")
        if m.get("format_version") not in READ_VERSIONS:
            raise CorpusError(
                f"{mpath}: corpus format version {m.get('format_version')!r}; this lsm_dist reads versions "
                f"{list(READ_VERSIONS)}. Convert the checkpoints again: {convert_command(m)}")
        self.version = m["format_version"]
        if "manifest_digest" not in m:  # every version lsm convert writes records it
            raise CorpusError(f"{mpath}: has no content digest (manifest_digest): edited after conversion, or "
                              f"not written by lsm convert; convert the checkpoints again: {convert_command(m)}")
        if manifest_digest(m) != m["manifest_digest"]:
            raise CorpusError(f"{mpath}: edited after conversion: its content digest is {manifest_digest(m)}, "
                              f"the manifest records {m['manifest_digest']} (re-run lsm convert)")
        self._check_layout()
        for s in self.shards:
            p = self.path / s["name"]
            if not p.is_file():
                raise CorpusError(f"{p}: shard listed in the manifest is missing")
            if p.stat().st_size != s["bytes"]:
                raise CorpusError(f"{p}: truncated or wrong shard: {p.stat().st_size} bytes, manifest says {s['bytes']}")
        if verify:
            self.verify()

    # -- manifest checks ---------------------------------------------------------------
    def _check_layout(self) -> None:
        """Every entry against the others and the shard sizes; builds ``self.blocks``."""
        m, mpath = self.manifest, self.path / MANIFEST
        try:
            st = m["settings"]
            tokens, chunk = _int(st["tokens"], "settings.tokens", 1), _int(st["chunk"], "settings.chunk", 1)
            shards, tensors = m["shards"], m["tensors"]
            names = [s["name"] for s in shards]
            sizes = [_int(s["bytes"], f"shard {s['name']} bytes") for s in shards]
            counts = [_int(s["num_samples"], f"shard {s['name']} num_samples") for s in shards]
        except (KeyError, TypeError) as e:
            raise CorpusError(f"{mpath}: malformed manifest (missing or wrong {e})") from None
        except CorpusError as e:
            raise CorpusError(f"{mpath}: {e}") from None
        for n in names:
            if not isinstance(n, str) or not SHARD_NAME.fullmatch(n):
                raise CorpusError(f"{mpath}: shard name {n!r} is not shard-NNNNNN.tar")
        if len(set(names)) != len(names):
            raise CorpusError(f"{mpath}: a shard is listed twice")
        self.blocks: list[list[Block]] = []
        in_shard = [0] * len(shards)
        ranges: list[list[tuple[int, int, str]]] = [[] for _ in shards]
        first = 0
        for ti, t in enumerate(tensors):
            name = t.get("name") if isinstance(t, dict) else None
            where = f"{mpath}: tensor {ti} ({name!r})"
            try:
                blocks, first = self._check_tensor(ti, t, (tokens, chunk), first, sizes, names, in_shard, ranges)
            except CorpusError as e:
                raise CorpusError(f"{where}: {e}") from None
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise CorpusError(f"{where}: malformed entry ({type(e).__name__}: {e})") from None
            self.blocks.append(blocks)
        if first != m.get("num_samples"):
            raise CorpusError(f"{mpath}: tensors hold {first} samples, the manifest says {m.get('num_samples')}")
        for si, (n, c) in enumerate(zip(in_shard, counts)):
            if n != c:
                raise CorpusError(f"{self.path / names[si]}: its blocks hold {n} samples, the manifest says {c}")
        for si, rs in enumerate(ranges):
            rs.sort()
            for (a, la, wa), (b, _, wb) in zip(rs, rs[1:]):
                if b < a + la + TAR_HEADER:
                    raise CorpusError(f"{self.path / names[si]}: members of {wa} and {wb} overlap in the manifest "
                                      f"(bytes {a}+{la} and {b})")
        if m.get("total_bytes") != sum(sizes):
            raise CorpusError(f"{mpath}: total_bytes {m.get('total_bytes')} != the shards' {sum(sizes)}")

    def _check_tensor(self, ti, t, sample, first, sizes, names, in_shard, ranges) -> tuple[list[Block], int]:
        S = sample[0] * sample[1]
        locs = t["locations"]
        if not isinstance(locs, list) or not locs:
            raise CorpusError("has no block locations")
        first_loc = locs[0] if isinstance(locs[0], list) and locs[0] else [None]
        shard_of = f"shard {names[first_loc[0]]}" if isinstance(first_loc[0], int) and \
            0 <= first_loc[0] < len(names) else "its shard"  # where its first block is: named in errors
        if t["index"] != ti:
            raise CorpusError(f"index is {t['index']!r}")
        if t["dtype"] not in DTYPES:
            raise CorpusError(f"{shard_of}: dtype {t['dtype']!r} is not a safetensors dtype")
        shape = [_int(d, "shape entry") for d in t["shape"]]
        numel = _int(t["numel"], "numel")
        if math.prod(shape) != numel or numel == 0:
            raise CorpusError(f"numel {numel} does not match shape {shape}")
        n_samples = _int(t["num_samples"], "num_samples", 1)
        if n_samples != -(-numel // S) or t["padding"] != n_samples * S - numel:
            raise CorpusError(f"num_samples {n_samples} / padding {t['padding']!r} do not fit numel {numel} "
                              f"at {S} values per sample")
        if t["first_sample"] != first:
            raise CorpusError(f"first_sample {t['first_sample']!r}, expected {first}")
        if self.version == 1:
            kind, itemsize = V1_KIND, 4
        else:
            kind = t.get("stored_dtype")
            if kind not in STORED:
                raise CorpusError(f"{shard_of}: stored dtype {kind!r} is not one this reader knows ({', '.join(STORED)})")
            itemsize = STORED[kind].itemsize
        mean, std = _num(t["mean"], f"{shard_of}: mean"), _num(t["std"], f"{shard_of}: std")
        if std < 0:
            raise CorpusError(f"{shard_of}: std is {std}, negative")
        read_mean, read_std = (0.0, 1.0) if kind == V1_KIND else (mean, std or 1.0)
        dt = np.dtype(np.float32) if kind == V1_KIND else STORED[kind].numpy
        blocks, expect = [], 0
        for loc in locs:
            if not isinstance(loc, list) or len(loc) != 7:
                raise CorpusError(f"location {loc!r} is not [shard, start, count, offset, bytes, offset, bytes]")
            si, start, n, off, nb, aux_off, aux_len = (_int(v, "a location value") for v in loc)
            if si >= len(names):
                raise CorpusError(f"location names shard index {si}; the manifest lists {len(names)} shards")
            shard = f"shard {names[si]}"
            if start != expect or n < 1 or start + n > n_samples:
                raise CorpusError(f"{shard}: block at sample {start} with {n} samples does not continue the tensor's "
                                  f"blocks (next sample {expect} of {n_samples})")
            head = npy_header(dt, (n, *sample))
            if nb - len(head) != n * S * itemsize:
                raise CorpusError(f"{shard}: block at sample {start} has {nb - len(head)} bytes of values; "
                                  f"{n} samples × tokens × chunk ({S}) × itemsize ({itemsize}) = {n * S * itemsize}")
            for o, ln, what in ((off, nb, "samples"), (aux_off, aux_len, "metadata")):
                if o < TAR_HEADER or o % TAR_HEADER or o + ln > sizes[si]:
                    raise CorpusError(f"{shard}: {what} of the block at sample {start} at bytes {o}+{ln} lie outside "
                                      f"the shard's {sizes[si]} bytes or off its 512-byte records")
                ranges[si].append((o, ln, f"tensor {ti} block {start}"))
            in_shard[si] += n
            expect += n
            last = start + n == n_samples
            blocks.append(Block(si, ti, start, n, off, nb, head, kind, read_mean, read_std, std == 0 and kind != V1_KIND,
                                S - t["padding"] if last else S, (aux_off, aux_len)))
        if expect != n_samples:
            raise CorpusError(f"{shard_of}: blocks hold {expect} samples, num_samples is {n_samples}")
        return blocks, first + n_samples

    # -- properties --------------------------------------------------------------------
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

    @property
    def kinds(self) -> set[str]:
        return {b.kind for bs in self.blocks for b in bs}

    def shard_paths(self) -> list[str]:
        return [str(self.path / s["name"]) for s in self.shards]

    def where(self, blk: Block) -> str:
        return f"{self.path / self.shards[blk.shard]['name']}: tensor {blk.tensor} ({self.tensors[blk.tensor]['name']!r})"

    # -- byte access -------------------------------------------------------------------
    def check_member(self, f, blk: Block, offset: int, length: int, name: str, head: bytes = b"") -> None:
        """The tar header before ``offset`` names member ``name`` of ``length`` bytes, and the
        member starts with ``head``; else CorpusError (``f`` is positioned after the check)."""
        f.seek(offset - TAR_HEADER)
        buf = f.read(TAR_HEADER + len(head))
        try:
            ti = tarfile.TarInfo.frombuf(buf[:TAR_HEADER], "utf-8", "surrogateescape")
        except (tarfile.HeaderError, ValueError) as e:
            raise CorpusError(f"{self.where(blk)}: no tar member header at byte {offset - TAR_HEADER} "
                              f"(corrupt or truncated tar shard, or an edited manifest): {e}") from None
        if ti.name != name or ti.size != length:
            raise CorpusError(f"{self.where(blk)}: the member at byte {offset} is {ti.name!r} of {ti.size} bytes, "
                              f"the manifest says {name!r} of {length} bytes (edited manifest or shard)")
        if buf[TAR_HEADER:] != head:
            raise CorpusError(f"{self.where(blk)}: member {name} does not start with the .npy header of "
                              f"{blk.count} × {self.tokens} × {self.chunk} {blk.kind} values")

    def read_into(self, f, blk: Block, out: np.ndarray | None = None) -> np.ndarray:
        """The stored values of ``blk`` as (count, tokens·chunk) in its numpy dtype, from open
        shard file ``f``, after checking the headers in front of them."""
        self.check_member(f, blk, blk.offset, blk.nbytes, blk.name, blk.head)
        arr = np.empty((blk.count, self.tokens * self.chunk), blk.numpy) if out is None else out
        got = f.readinto(memoryview(arr).cast("B"))
        if got != arr.nbytes:
            raise CorpusError(f"{self.where(blk)}: corrupt or truncated tar shard: block at {blk.offset} has "
                              f"{got} of {arr.nbytes} bytes")
        if blk.constant:
            self.check_constant(blk, arr)
        return arr

    def check_constant(self, blk: Block, raw: np.ndarray) -> None:
        """A block whose manifest std is 0 must hold the mean only (its padding aside)."""
        x = np.empty(raw.shape, np.float32)
        standardize(raw, blk.kind, blk.mean, 1.0, x)
        flat = x.reshape(-1)[: (blk.count - 1) * raw.shape[1] + blk.valid]
        if np.any(flat != 0):
            raise CorpusError(f"{self.where(blk)}: the manifest gives std 0, but the tensor is not constant")

    def read_raw(self, blk: Block) -> np.ndarray:
        with open(self.path / self.shards[blk.shard]["name"], "rb", buffering=0) as f:
            return self.read_into(f, blk)

    def normalize(self, blk: Block, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Standardized float32 (count, tokens·chunk) of a block's stored values: what the model
        sees (format 1 samples as they are; padding exactly 0)."""
        if out is None:
            out = raw if blk.kind == V1_KIND else np.empty(raw.shape, np.float32)
        if blk.kind == V1_KIND:
            if out is not raw:
                np.copyto(out, raw)
            return out
        standardize(raw, blk.kind, blk.mean, blk.std, out)
        if blk.valid < raw.shape[1]:
            out[-1, blk.valid :] = 0
        return out

    def samples(self, blk: Block) -> np.ndarray:
        """Standardized samples of one block, (count, tokens, chunk) float32."""
        return self.normalize(blk, self.read_raw(blk)).reshape(blk.count, self.tokens, self.chunk)

    def read_samples(self, t: dict) -> np.ndarray:
        """All standardized samples of tensor entry ``t``: (num_samples, tokens, chunk) float32."""
        return np.concatenate([self.samples(b) for b in self.blocks[t["index"]]])

    def rebuild(self, t: dict) -> torch.Tensor:
        """The original tensor, bit-exact, in its original dtype."""
        blocks = self.blocks[t["index"]]
        if self.version == 1:
            fixes = []
            for b in blocks:
                with open(self.path / self.shards[b.shard]["name"], "rb", buffering=0) as f:
                    off, ln = b.aux
                    self.check_member(f, b, off, ln, member_key(b.tensor, b.start) + ".fix.npy")
                    fixes.append(_load_npy(f.read(ln), self.where(b)))
            return unchunk(self.read_samples(t), t["shape"], DTYPES[t["dtype"]], t["mean"], t["std"],
                           np.concatenate(fixes, axis=1))
        if t["stored_dtype"] != t["dtype"]:
            raise CorpusError(f"{self.path}: tensor {t['name']} stores {t['stored_dtype']} values of a {t['dtype']} "
                              "tensor: they are not the tensor itself")
        raw = np.concatenate([self.read_raw(b) for b in blocks]).reshape(-1)[: t["numel"]]
        return as_tensor(raw, t["stored_dtype"]).reshape(t["shape"])

    def verify(self, names: list[str] | None = None) -> None:
        """sha256 of every shard (or of ``names``) against the manifest."""
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

    def summary(self) -> str:
        m = self.manifest
        by_block: dict[str, list[int]] = {}
        for t in m["tensors"]:
            agg = by_block.setdefault(t["block"], [0, 0, 0])
            agg[0] += 1
            agg[1] += t["num_samples"]
            agg[2] += t.get("fixups", 0)
        stored = "float32 (standardized)" if self.version == 1 else \
            "/".join(sorted({t["stored_dtype"] for t in m["tensors"]})) + " (the weights' own values; standardized on read)"
        lines = [
            f"corpus {self.path}  (digest {m['plan_digest']}, format v{m['format_version']})",
            f"  sample = {self.tokens} tokens x {self.chunk} values, {stored}; "
            f"{m['num_samples']} samples in {len(m['shards'])} shard(s), {m['total_bytes'] / 2**20:.1f} MiB",
            "  models: " + ", ".join(f"{x['id']} ({x['model_type']}, {x['num_layers']} layers, {'/'.join(x['dtypes'])})" for x in m["models"]),
        ]
        for b, (n, s, fx) in sorted(by_block.items()):
            lines.append(f"  {b:5s}: {n:5d} tensors, {s:8d} samples" + (f", {fx} exactness fixups" if self.version == 1 else ""))
        return "\n".join(lines)


def _load_npy(data: bytes, what: str) -> np.ndarray:
    import io

    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise CorpusError(f"{what}: corrupt array member: {e}") from None
