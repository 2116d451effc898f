"""`lsm verify CORPUS [--rebuild]`: every byte the manifest points at, checked.

1. The manifest (``Corpus``): format, content digest, every entry against the others and the
   shard sizes.
2. Every shard's sha256; every block's tar and .npy headers and (format 2) its .json member,
   which must repeat the manifest entry (tensor, model, name, layer, block, role, shape, dtype,
   stored dtype, start, count, first sample).
3. Format 2: every tensor's mean/std recomputed from its stored values must equal the
   manifest's (the same deterministic ``norm_stats`` conversion ran).
4. ``--rebuild``: every tensor rebuilt (format 1: with its fixups) and, where the source
   checkpoint is still at the manifest's path, compared with it bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lsm_dist.adapters import AdapterError, open_ref, split_model_ref
from lsm_dist.checkpoint import Checkpoint, CheckpointError, content_digest
from lsm_dist.chunking import norm_stats, to_bits
from lsm_dist.corpus.convert import CorpusError, member_key
from lsm_dist.corpus.corpus import Corpus
from lsm_dist.delta import task_vector

_META_KEYS = ("model", "name", "layer", "block", "role", "shape", "dtype", "stored_dtype")


def _check_members(c: Corpus) -> int:
    """Headers of every block member (and format 2: its metadata); returns the block count."""
    n = 0
    for si, s in enumerate(c.shards):
        with open(c.path / s["name"], "rb", buffering=0) as f:
            for blocks in c.blocks:
                for b in blocks:
                    if b.shard != si:
                        continue
                    n += 1
                    c.check_member(f, b, b.offset, b.nbytes, b.name, b.head)
                    off, ln = b.aux
                    if c.version == 1:
                        c.check_member(f, b, off, ln, member_key(b.tensor, b.start) + ".fix.npy")
                        continue
                    c.check_member(f, b, off, ln, member_key(b.tensor, b.start) + ".json")
                    try:
                        meta = json.loads(f.read(ln))
                    except ValueError:
                        raise CorpusError(f"{c.where(b)}: block metadata at byte {off} is not JSON") from None
                    t = c.tensors[b.tensor]
                    want = {k: t[k] for k in _META_KEYS} | {
                        "tensor": b.tensor, "start": b.start, "count": b.count, "first_sample": t["first_sample"] + b.start}
                    diff = sorted(k for k in want if meta.get(k) != want[k])
                    if diff:
                        raise CorpusError(f"{c.where(b)}: the manifest's {diff} disagree with the block's own "
                                          f"metadata, which says { {k: meta.get(k) for k in diff} }: edited manifest")
    return n


def _sources(c: Corpus) -> tuple[dict[str, Checkpoint], list[str]]:
    """The source checkpoints still at their recorded paths (and notes on the others)."""
    found, notes = {}, []
    for m in c.manifest["models"]:
        if not all(Path(p).exists() for p in split_model_ref(m["path"]) if p):
            notes.append(f"source of {m['id']} is not at {m['path']}: rebuilt from the corpus only")
            continue
        try:
            ck = open_ref(m["path"])
        except (CheckpointError, AdapterError) as e:
            raise CorpusError(f"source of {m['id']}: {e}") from None
        if ck.digest() != m["digest"]:
            raise CorpusError(f"{m['path']}: not the checkpoint model {m['id']} was converted from "
                              f"(header digest {ck.digest()}, the manifest says {m['digest']})")
        found[m["id"]] = ck
    return found, notes


def verify_corpus(path: str | Path, rebuild: bool = False) -> str:
    """Check ``path`` (raises ``CorpusError`` naming the first problem); returns a report."""
    c = Corpus(path, verify=True)
    nblocks = _check_members(c)
    lines = [c.summary(), f"OK: manifest, {len(c.shards)} shard checksum(s), {nblocks} block header(s)"
             + (" and metadata" if c.version >= 2 else "")]
    sources, notes = _sources(c) if rebuild else ({}, [])
    base = None
    if rebuild and sources and c.manifest.get("delta"):  # a delta corpus: the source is W - W_base
        d = c.manifest["delta"]
        if not Path(d["base"]).exists():
            notes.append(f"base {d['base']} of the delta corpus is gone: rebuilt from the corpus only")
            sources = {}
        else:
            base = Checkpoint(d["base"])
            if content_digest(base) != d["base_digest"]:
                raise CorpusError(f"{d['base']}: not the base the delta corpus was converted against "
                                  f"(content digest {content_digest(base)}, the manifest says {d['base_digest']})")
    compared = 0
    if c.version >= 2 or rebuild:
        for t in c.tensors:
            x = c.rebuild(t)
            if c.version >= 2 and t["std"] != 0:  # std 0: constancy was checked on read
                stats = norm_stats(x)
                if stats != (t["mean"], t["std"]):
                    raise CorpusError(f"{c.path}: tensor {t['name']}: mean/std recomputed from its values are "
                                      f"{stats}, the manifest says ({t['mean']}, {t['std']}): edited manifest")
            ck = sources.get(t["model"])
            if ck is not None:
                src = ck.read(t["name"]) if base is None else task_vector(ck, base, t["name"])
                if src.dtype != x.dtype or src.shape != x.shape or not torch.equal(to_bits(src), to_bits(x)):
                    raise CorpusError(f"{c.path}: tensor {t['name']} of {t['model']} does not rebuild bit for bit: "
                                      f"it differs from the source {ck.path}")
                compared += 1
        if c.version >= 2:
            lines.append(f"OK: mean/std of {len(c.tensors)} tensor(s) match their stored values")
    if rebuild:
        lines.append(f"OK: every tensor rebuilds; {compared} of {len(c.tensors)} compared bit for bit with "
                     "their source checkpoint")
        lines += notes
    return "\n".join(lines)
