"""Training data: the corpus stream minus a held-out set, and in-memory validation sets.

The held-out set is chosen from the manifest alone (so every rank agrees without talking):
whole sample blocks (tar members, one tensor each) are ranked per block type (attn / mlp /
other) by a seeded hash, and the first ones are held out until ``val_fraction`` of that
type's samples is reached (at least one block of every type that has two or more). Training
never sees them (:class:`TrainStream` drops those members); validation reads them by byte
offset, without scanning the shards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from lsm_dist.corpus.convert import CorpusError
from lsm_dist.corpus.plan import BLOCK_IDS
from lsm_dist.corpus.reader import Corpus, CorpusStream


def _rank(seed: int, tensor: int, start: int) -> int:
    return int(hashlib.sha256(f"{seed}:{tensor}:{start}".encode()).hexdigest()[:12], 16)


def blocks_of(corpus: Corpus) -> list[tuple[int, int, int, str]]:
    """Every sample block of the corpus as (tensor index, start, count, block type)."""
    return [(b.tensor, b.start, b.count, t["block"]) for t, bs in zip(corpus.tensors, corpus.blocks) for b in bs]


def choose_holdout(corpus: Corpus, fraction: float, seed: int) -> set[tuple[int, int]]:
    """(tensor, start) keys of the held-out blocks; empty when ``fraction`` is 0."""
    if fraction <= 0:
        return set()
    by_type: dict[str, list[tuple[int, int, int]]] = {}
    for ti, start, n, block in blocks_of(corpus):
        by_type.setdefault(block, []).append((ti, start, n))
    held: set[tuple[int, int]] = set()
    for blocks in by_type.values():
        if len(blocks) < 2:
            continue
        total = sum(n for *_, n in blocks)
        taken = k = 0
        for ti, start, n in sorted(blocks, key=lambda b: _rank(seed, b[0], b[1])):
            if taken >= fraction * total or k >= len(blocks) - 1:  # keep one for training
                break
            held.add((ti, start))
            taken, k = taken + n, k + 1
    return held


class TrainStream(CorpusStream):
    """A :class:`CorpusStream` that never yields the held-out blocks (``exclude`` keys)."""

    def __init__(self, corpus: Corpus, batch_size: int, *, exclude: set[tuple[int, int]], **kw):
        super().__init__(corpus, batch_size, **kw)
        self.exclude = exclude
        # indexed backend: do not even read them
        self.index = [[b for b in blocks if (b.tensor, b.start) not in exclude] for blocks in self.index]
        if not any(self.index):
            raise CorpusError(f"{corpus.path}: no training samples left after holding out "
                              f"{len(exclude)} block(s) for validation")

    def _blocks(self, worker: int, nworkers: int):
        for raw, blk, meta in super()._blocks(worker, nworkers):
            if (blk.tensor, blk.start) not in self.exclude:  # webdataset backend
                yield raw, blk, meta


@dataclass
class EvalSet:
    """Samples in memory with their block / conditioning ids."""

    x: torch.Tensor  # (N, tokens, chunk) float32
    layer: torch.Tensor
    block: torch.Tensor
    role: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def shard(self, rank: int, world: int) -> EvalSet:
        """This rank's equal share (the remainder is dropped: every rank runs as many forwards,
        which ZeRO-3's collective forward requires)."""
        n = (len(self) // world) * world
        sl = slice(rank, n, world)
        return EvalSet(self.x[sl], self.layer[sl], self.block[sl], self.role[sl])


def load_eval_set(corpus: Corpus, keys: list[tuple[int, int]] | None, max_samples: int,
                  seed: int, roles: list[str] | None = None) -> EvalSet:
    """Read the blocks ``keys`` (all blocks when None, spread by a seeded order) by offset,
    up to ``max_samples`` samples taken evenly across the chosen blocks.

    ``roles``: the role vocabulary the model was trained with (the training corpus'
    ``manifest["roles"]``), so another corpus' roles get the training ids (unknown ones 0)."""
    if keys is None:
        keys = [(ti, start) for ti, start, _n, _b in blocks_of(corpus)]
    keys = sorted(keys, key=lambda k: _rank(seed + 1, *k))
    roles = {r: i for i, r in enumerate(roles if roles is not None else corpus.manifest["roles"])}
    loc = {(b.tensor, b.start): b for bs in corpus.blocks for b in bs}
    counts = [loc[k].count for k in keys]
    if sum(counts) > max_samples:  # take ~the same share of every block, in hash order
        per = max(1, -(-max_samples // max(len(keys), 1)))  # ceil
        counts = [min(c, per) for c in counts]
        keep, acc = [], 0
        for k, c in zip(keys, counts):
            if acc >= max_samples:
                break
            keep.append((k, min(c, max_samples - acc)))
            acc += keep[-1][1]
    else:
        keep = list(zip(keys, counts))
    xs, meta = [], []
    for (ti, start), c in keep:
        # standardized, headers checked; a copy of the c samples kept, not a view that would keep
        # the whole block alive (8192 one-sample views of 256-sample blocks held 3.7 GB at 3B)
        xs.append(corpus.samples(loc[(ti, start)])[:c].copy())
        t = corpus.tensors[ti]
        layer = t["layer"] if t["layer"] is not None else -1
        meta += [(layer, BLOCK_IDS[t["block"]], roles.get(t["role"], 0))] * c
    if not xs:
        empty = torch.zeros(0, dtype=torch.long)
        return EvalSet(torch.zeros(0, corpus.tokens, corpus.chunk), empty, empty, empty)
    m = torch.tensor(meta, dtype=torch.long)
    return EvalSet(torch.from_numpy(np.concatenate(xs)), m[:, 0], m[:, 1], m[:, 2])
