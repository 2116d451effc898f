"""Task-vector merge operators: every method that merges the deltas ``δ_i = x_i - base``.

One procedure, parameterized per method (as mergekit's generalized task arithmetic):

1. **sparsify** each delta with its own ``density`` d_i (``params.density``, per input):
   ``magnitude`` keeps the ``max(1, floor(d·n))`` largest |δ| (TIES); ``random`` keeps each
   entry with probability d (DARE); ``outliers`` drops the ``floor(γ·n)`` largest and then the
   smallest entries, keeping ``floor(d·n)`` (Model Breadcrumbs); ``della`` keeps each entry of
   a row with probability ``d - ε + 2ε·rank/(n-1)`` by its magnitude rank in the row (DELLA);
2. **rescale** what was kept (``params.rescale``): ``inverse`` divides each kept entry by its
   keep probability (the DARE / DELLA papers; the default for the random methods), ``l1``
   matches the delta's L1 norm (mergekit's ``rescale: true``), ``none`` leaves it;
3. **weight** each delta by ``w_i`` (``params.weights``, default 1);
4. **consensus** (``*_ties``, ``ties``, ``della``): per entry, the elected sign is that of
   Σ w_i δ_i; only the weighted deltas of that sign count (``params.sign_tie``: at an exact zero
   sum no sign is elected, or + wins as in mergekit);
5. **sum** the (agreeing) weighted deltas; with ``normalize`` divide by the sum of the
   (agreeing) weights, per entry (1 where that is 0); multiply by ``params.scale``; add the base.

Linear-style sums, TIES trimming and DARE drops run by **row blocks** (:func:`stream_deltas`):
a weight merge reads the inputs' rows block by block from their files. TIES finds each delta's
threshold by radix selection (``tie_break: spread``) or, for mergekit's selection among the
entries tied at it (``tie_break: argsort``), by replaying torch's sort on |δ| of the whole
tensor where it decides the k-th position (:mod:`lsm_dist.merge.introselect`).
Random masks come from one generator per input and row block (seeded by the plan's seed, the
tensor name, the input and the block), one uniform draw per entry, so a merge is reproducible on
any rank; Breadcrumbs and DELLA (ranks over the tensor / a row) merge whole tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lsm_dist.merge.introselect import first_k
from lsm_dist.merge.operators import (
    OPERATORS,
    MergeParams,
    make_generator,
    per_input,
    register_operator,
    resolve_weights,
    row_spans,
)

L1_EPS = 1e-7


def rescale_masked(delta: torch.Tensor, mask: torch.Tensor, how: str, keep_prob=None) -> torch.Tensor:
    """``delta · mask`` rescaled: by 1/keep_prob (inverse), to delta's L1 norm (l1), or not."""
    kept = delta * mask
    if how == "inverse" and keep_prob is not None:
        return kept / keep_prob
    if how == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
        if before >= L1_EPS and after >= L1_EPS:
            return kept * (before / after)
    return kept


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """1 on the ``max(1, floor(density·n))`` entries of largest |delta|, 0 elsewhere."""
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    mask = torch.zeros_like(flat)
    mask[torch.argsort(flat.abs().float(), descending=True)[:k]] = 1  # mergekit's order at ties
    return mask.reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the floor(γ·n) largest |delta|, keep the next floor(density·n)."""
    flat = delta.reshape(-1)
    n = flat.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros_like(flat)
    mask[torch.sort(flat.abs().float()).indices[bottom:bottom + keep]] = 1
    return mask.reshape(delta.shape)


def della_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probability density - ε + 2ε·rank/(n-1), ranks of |delta| within each row
    (rows: the first axis; a vector is one row; a one-column row gets ``density``)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    if n < 2:
        return torch.full_like(delta, density)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(delta.dtype)
    return ((density - epsilon) + ranks / (n - 1) * 2 * epsilon).reshape(delta.shape)


def sparsify(delta: torch.Tensor, how: str | None, density: float, rescale: str,
             gen: torch.Generator, gamma: float = 0.0, epsilon: float = 0.0) -> torch.Tensor:
    """Step 1 + 2 of the module doc for one delta."""
    if how is None or density >= 1.0:
        return delta
    if how == "magnitude":
        return rescale_masked(delta, magnitude_mask(delta, density), rescale)
    if how == "outliers":
        return rescale_masked(delta, outlier_mask(delta, density, gamma), rescale)
    if how == "random":
        prob = density
    elif how == "della":
        if not (density - epsilon > 0.0 and density + epsilon < 1.0):
            raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density {density}, "
                             f"epsilon {epsilon} (params.density / params.epsilon)")
        prob = della_keep_prob(delta, density, epsilon)
    else:
        raise ValueError(f"unknown sparsification {how!r}")
    mask = (torch.rand(delta.shape, generator=gen) < prob).to(delta.dtype)
    return rescale_masked(delta, mask, rescale, prob)


def merge_deltas(name: str, xs, p: MergeParams, base: torch.Tensor, gen: torch.Generator,
                 how: str | None, consensus: bool, normalize_default: bool,
                 density: list[float] | None = None, key: str = "") -> torch.Tensor:
    """Steps 1-5 of the module doc for method ``name`` on whole tensors: by row blocks
    (:func:`stream_deltas` over views of ``xs``) where the method streams, else at once."""
    n = len(xs)
    if streams(how, p):
        shape = tuple(base.shape)
        flat = [x.reshape(shape[0], -1) if x.dim() else x.reshape(1, 1) for x in (*xs, base)]
        out = torch.empty(flat[-1].shape, dtype=base.dtype)
        pos = 0
        for blk in stream_deltas(name, n, lambda i, a, b: flat[i][a:b], lambda a, b: flat[n][a:b],
                                 flat[-1].shape, p, how, consensus, normalize_default, density,
                                 key=key):
            out[pos:pos + blk.shape[0]] = blk
            pos += blk.shape[0]
        return out.reshape(shape)
    op = OPERATORS[name]
    w = torch.tensor(resolve_weights(op, p, n), dtype=base.dtype)
    dens = density if density is not None else (per_input(p, "density", n) if how else [1.0] * n)
    gam = per_input(p, "gamma", n) if how == "outliers" else [0.0] * n
    eps = per_input(p, "epsilon", n) if how == "della" else [0.0] * n
    rescale = p.rescale or ("inverse" if how in ("random", "della") else "none")
    deltas = base.new_empty((n, *base.shape))
    for i, x in enumerate(xs):
        deltas[i] = sparsify(x - base, how, dens[i], rescale, gen, gam[i], eps[i])
    return base + combine(deltas, w, p, consensus, normalize_default)


def combine(deltas: torch.Tensor, w: torch.Tensor, p: MergeParams, consensus: bool,
            normalize_default: bool) -> torch.Tensor:
    """Steps 3-5 without the base: the (agreeing) weighted deltas summed, normalized, scaled
    (``deltas``: the sparsified deltas stacked on a first axis, weighted in place)."""
    n = deltas.shape[0]
    wv = w.reshape(n, *([1] * (deltas.dim() - 1)))
    deltas.mul_(wv)
    if consensus:
        signs = deltas.sign()
        total = deltas.sum(dim=0)
        elected = torch.where(total >= 0, 1.0, -1.0) if p.sign_tie == "positive" else total.sign()
        mask = ((signs == elected) & (signs != 0)).to(deltas.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (wv * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if (p.normalize if p.normalize is not None else normalize_default):
        mixed /= divisor
    if p.scale != 1.0:
        mixed *= p.scale
    return mixed


# ------------------------------------------------------------------ by row blocks
_HALF = 1 << 16


def streams(how: str | None, p: MergeParams) -> bool:
    """Whether a task-vector method merges by row blocks under ``p``: no sparsification, random
    drops (DARE) and magnitude trimming (TIES; with ``tie_break: argsort`` the tied entries kept
    are those torch's argsort of |δ| over the whole tensor puts first, :func:`argsort_thresholds`).
    Breadcrumbs and DELLA (ranks over the whole tensor / row), and TIES in mergekit's argsort
    order with ``rescale: l1`` (mergekit's L1 norms are sums over the whole tensor in its dtype)
    need the whole tensor."""
    if how == "magnitude":
        return p.tie_break == "spread" or (p.rescale or "none") != "l1"
    return how is None or how == "random"


def _bits(d: torch.Tensor) -> torch.Tensor:
    """|d| as float32 bit patterns (int32): for non-negative floats their order is the values'."""
    return d.abs().float().reshape(-1).view(torch.int32)


def _kth_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry of a histogram (k ≥ 1), and how many lie above it."""
    c = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(c, k))
    return len(hist) - 1 - j, (int(c[j - 1]) if j else 0)


def _spread(pos: torch.Tensor) -> torch.Tensor:
    """16-bit Fibonacci hashes of flat positions (int64): a fixed pseudo-random order, spread
    over the tensor, in which entries tied at a trimming threshold are kept."""
    return ((pos * 0x9E3779B1) & 0xFFFFFFFF) >> 16


def magnitude_thresholds(sweep, ks: dict[int, int]) -> dict[int, tuple[int, int, int, int]]:
    """Per input i, what keeps exactly the ``ks[i]`` largest |δ_i|: ``(t, keep, h, rest)``, t the
    float32 bit pattern of the k-th largest |δ_i| (all above it are kept), and of the entries
    equal to t, those whose :func:`_spread` hash is below h and the first ``rest`` (in index
    order) whose hash is h (h = -1: none of them, h = 2^16: all). Found exactly by radix selection
    with 16-bit histograms over ``sweep()`` (an iterator of ``(start, {i: δ_i block})``, start the
    block's flat offset): two passes, a third where the tied entries are split. Memory: the
    histograms and a block, never the whole tensor (an argsort of it is 16 bytes per entry)."""
    hi = {i: torch.zeros(_HALF, dtype=torch.int64) for i in ks}
    for _, deltas in sweep():
        for i in ks:
            hi[i] += torch.bincount((_bits(deltas[i]) >> 16).long(), minlength=_HALF)
    top = {i: _kth_from_top(hi[i], k) for i, k in ks.items()}
    lo = {i: torch.zeros(_HALF, dtype=torch.int64) for i in ks}
    for _, deltas in sweep():
        for i in ks:
            b = _bits(deltas[i])
            lo[i] += torch.bincount((b[(b >> 16) == top[i][0]] & (_HALF - 1)).long(), minlength=_HALF)
    out, split = {}, {}
    for i, k in ks.items():
        bucket, above = top[i]
        low, above_low = _kth_from_top(lo[i], k - above)
        t, keep, tied = (bucket << 16) | low, k - above - above_low, int(lo[i][low])
        out[i] = (t, keep, _HALF, 0) if keep == tied else (t, keep, -1, 0)
        if 0 < keep < tied:
            split[i] = torch.zeros(_HALF, dtype=torch.int64)
    if split:
        for start, deltas in sweep():
            for i, h in split.items():
                pos = (_bits(deltas[i]) == out[i][0]).nonzero().squeeze(1)
                h += torch.bincount(_spread(pos + start), minlength=_HALF)
        for i, h in split.items():
            c = h.cumsum(0)
            j = int(torch.searchsorted(c, out[i][1]))
            out[i] = (out[i][0], out[i][1], j, out[i][1] - (int(c[j - 1]) if j else 0))
    return out


def argsort_thresholds(sweep_one, ks: dict[int, int], numel: int) -> dict[int, tuple[int, torch.Tensor]]:
    """Per input i, what mergekit's ``argsort(|δ_i|.float(), descending=True)[:k]`` keeps, as
    ``(t, chosen)``: t the float32 bit pattern of the k-th value in that order (every entry above
    it is kept) and ``chosen`` the flat positions (ascending) of the entries equal to t that the
    sort places among the first k. ``sweep_one(i)`` yields ``(start, δ_i block)`` over the tensor.
    |δ_i| of the whole tensor is gathered in δ's own dtype (bf16 / fp16 values compare as their
    float32 copies) and the sort's own partitions are replayed on the range that holds the k-th
    position only (:func:`introselect.first_k`). One input at a time: 6 bytes per bf16 entry
    while it selects (mergekit's argsort: 16, beside its float32 copy and the inputs), then the
    chosen ties only."""
    out = {}
    for i, k in ks.items():
        buf = None
        for start, d in sweep_one(i):
            if buf is None:
                buf = torch.empty(numel, dtype=d.dtype)
            buf[start:start + d.numel()] = d.reshape(-1).abs()
        t, chosen = first_k(buf, k)
        del buf
        out[i] = (int(torch.tensor(t, dtype=torch.float32).view(torch.int32)), chosen)
    return out


def stream_deltas(name: str, n: int, read, read_base, shape: tuple[int, ...], p: MergeParams,
                  how: str | None, consensus: bool, normalize_default: bool,
                  density: list[float] | None = None, key: str = "") -> Iterator[torch.Tensor]:
    """Steps 1-5 of the module doc by row blocks (:func:`row_spans`): ``read(i, a, b)`` and
    ``read_base(a, b)`` give rows ``[a, b)`` of input i and of the base (in the working dtype);
    yields the merged rows in order. TIES trimming keeps exactly ``max(1, floor(d·n))`` entries:
    those above the threshold and, of those equal to it, the ones first in a fixed hash order of
    their positions (``tie_break: spread``, :func:`magnitude_thresholds`: the same on any device,
    spread over the tensor) or the ones mergekit's argsort puts first (``tie_break: argsort``,
    :func:`argsort_thresholds`; weights stored in bf16 make large tie groups). DARE draws each row block's mask from its own generator (seeded by the
    plan's seed, the tensor, the input and the block). ``rescale: l1`` first sums |δ| and |kept δ|
    over the tensor (float64) in a pass of its own."""
    if not streams(how, p):
        raise ValueError(f"{name}: this setting merges whole tensors, not row blocks")
    op = OPERATORS[name]
    spans = row_spans(tuple(shape))
    numel = math.prod(shape)
    dens = density if density is not None else (per_input(p, "density", n) if how else [1.0] * n)
    rescale = p.rescale or ("inverse" if how == "random" else "none")
    trimmed = [i for i in range(n) if how is not None and dens[i] < 1.0]

    def deltas_of(a: int, b: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        base = read_base(a, b)
        return base, [read(i, a, b) - base for i in range(n)]

    row = numel // max(1, spans[-1][1]) if spans else 0

    def sweep():
        for a, b in spans:
            yield a * row, dict(enumerate(deltas_of(a, b)[1]))

    ks = {i: max(1, int(dens[i] * numel)) for i in trimmed} if how == "magnitude" else {}
    by_sort = bool(ks) and p.tie_break == "argsort"
    if by_sort:
        thr = argsort_thresholds(lambda i: ((a * row, read(i, a, b) - read_base(a, b)) for a, b in spans),
                                 ks, numel)
    else:
        thr = magnitude_thresholds(sweep, ks) if ks else {}
    seen_ties = dict.fromkeys(trimmed, 0)

    def masks(j: int, deltas: list[torch.Tensor], ties: dict[int, int]) -> dict[int, torch.Tensor]:
        out = {}
        for i in trimmed:
            d = deltas[i]
            if how == "random":
                gen = make_generator(p.seed, f"{key}:{i}:{j}")
                out[i] = (torch.rand(d.shape, generator=gen) < dens[i]).to(d.dtype)
                continue
            if by_sort:  # above the threshold, and the tied entries the sort placed among the first k
                t, chosen = thr[i]
                m = _bits(d) > t
                start = spans[j][0] * row
                lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + m.numel()])).tolist()
                m[chosen[lo:hi] - start] = True
                out[i] = m.reshape(d.shape).to(d.dtype)
                continue
            t, keep, h, rest = thr[i]
            bits = _bits(d)
            m = bits > t
            if h >= _HALF:
                m |= bits == t
            elif h >= 0:  # the tied entries whose hash is below h, then the first `rest` with hash h
                pos = (bits == t).nonzero().squeeze(1)
                hs = _spread(pos + spans[j][0] * row)
                take = hs < h
                last = (hs == h).nonzero().squeeze(1)
                if ties[i] < rest and last.numel():
                    take[last[: rest - ties[i]]] = True
                    ties[i] = min(rest, ties[i] + last.numel())
                m[pos[take]] = True
            out[i] = m.reshape(d.shape).to(d.dtype)
        return out

    factor: dict[int, torch.Tensor] = {}
    if rescale == "l1" and trimmed:
        sums = {i: [0.0, 0.0] for i in trimmed}
        ties = dict(seen_ties)
        for j, (a, b) in enumerate(spans):
            _, deltas = deltas_of(a, b)
            for i, m in masks(j, deltas, ties).items():
                sums[i][0] += float(deltas[i].abs().sum(dtype=torch.float64))
                sums[i][1] += float((deltas[i] * m).abs().sum(dtype=torch.float64))
        factor = {i: torch.tensor(s[0] / s[1], dtype=torch.float32) for i, s in sums.items()
                  if s[0] >= L1_EPS and s[1] >= L1_EPS}
    w = None
    for j, (a, b) in enumerate(spans):
        base, deltas = deltas_of(a, b)
        if w is None:
            w = torch.tensor(resolve_weights(op, p, n), dtype=base.dtype)
        for i, m in masks(j, deltas, seen_ties).items():
            kept = deltas[i] * m
            if rescale == "inverse" and how == "random":
                kept = kept / dens[i]
            elif i in factor:
                kept = kept * factor[i]
            deltas[i] = kept
        yield base + combine(torch.stack(deltas), w, p, consensus, normalize_default)


# name: (sparsification, sign consensus, normalize by default, per-input parameters)
FAMILY = {
    "task_arithmetic": (None, False, False, ()),
    "ties": ("magnitude", True, True, ("density",)),
    "dare": ("random", False, False, ()),
    "dare_linear": ("random", False, False, ("density",)),
    "dare_ties": ("random", True, False, ("density",)),
    "breadcrumbs": ("outliers", False, False, ("density", "gamma")),
    "breadcrumbs_ties": ("outliers", True, False, ("density", "gamma")),
    "della": ("della", True, True, ("density", "epsilon")),
    "della_linear": ("della", False, False, ("density", "epsilon")),
}
DOCS = {
    "task_arithmetic": "base + Σ w_i (z_i - base).",
    "ties": "TIES: trim deltas to `density` by magnitude, elect signs, disjoint (weighted) mean.",
    "dare": "DARE: drop delta entries with probability drop_p, rescale by 1/(1-p), base + Σ w_i δ̃_i.",
    "dare_linear": "DARE with per-input density: random drop, rescale, weighted sum of deltas.",
    "dare_ties": "DARE drop + rescale, then TIES sign consensus.",
    "breadcrumbs": "Model Breadcrumbs: drop the largest (gamma) and smallest deltas, weighted sum.",
    "breadcrumbs_ties": "Model Breadcrumbs masks, then TIES sign consensus.",
    "della": "DELLA: magnitude-ranked random drop (density ± epsilon), rescale, sign consensus, mean.",
    "della_linear": "DELLA drop + rescale, weighted sum of deltas (no consensus).",
}


def _register(name: str) -> None:
    how, consensus, norm, extra = FAMILY[name]

    def fn(xs, p: MergeParams, base: torch.Tensor, gen: torch.Generator, key: str = "", **_) -> torch.Tensor:
        dens = [1.0 - p.drop_p] * len(xs) if name == "dare" else None
        return merge_deltas(name, xs, p, base, gen, how, consensus, norm, density=dens, key=key)

    def stream(n: int, read, read_base, shape, p: MergeParams, key: str):
        if not streams(how, p):
            return None
        dens = [1.0 - p.drop_p] * n if name == "dare" else None
        return stream_deltas(name, n, read, read_base, shape, p, how, consensus, norm, density=dens, key=key)

    fn.__doc__ = DOCS[name]
    register_operator(name, min_inputs=1, needs_base=True, weights="scale", per_input=extra,
                      native_dtype=True, stream=stream)(fn)


for _name in FAMILY:
    _register(_name)
