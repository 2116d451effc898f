"""Which entries torch's CPU argsort puts first, without sorting: mergekit's TIES selection.

mergekit trims a task vector to its ``k`` largest magnitudes with
``torch.argsort(|δ|.float(), descending=True)[:k]``. Where entries tie at the k-th value (weights
stored in bf16 make large tie groups), *which* of them are kept is decided by the sort algorithm:
torch's CPU sort of a float tensor is libstdc++'s ``std::sort`` on (value, index) pairs compared
by value -- an introsort: median-of-three pivot moved to the front, Hoare partition, loop on the
left part and recurse into the right one until ranges of at most 16 entries remain (heapsort when
the depth limit ``2·floor(log2 n)`` is spent), then one insertion sort over the whole array, which
moves no entry out of its final range and keeps equal entries in order
(``test_first_k_is_torch_argsorts_selection`` checks the selection against torch's argsort on
ties of every size).

The *set* of entries that ends in the first k positions is fixed as soon as a partition cuts at
k, or a range holding both positions k-1 and k is at most 16 long; ranges that do not hold that
boundary never change which side of it their entries end on. :func:`first_k` therefore runs the
introsort on the chain of ranges holding the boundary only (a quickselect that makes the sort's
own moves: ~2n entries partitioned in all instead of n·log n compared), each partition as a few
vectorized passes: the left scan of a Hoare partition stops at the entries ≤ the pivot (in the
sort's order), the right scan at the entries ≥ it, and the i-th left stop is swapped with the
i-th right stop while the first lies before the second. Memory: the values and an int32 position
per entry (6 bytes per bf16 entry; torch's argsort needs 16 beside its input), plus windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

THRESHOLD = 16  # libstdc++'s _S_threshold: ranges of at most this many entries are left to the insertion sort
WINDOW = 1 << 22  # entries per vectorized pass
SUB = 1 << 16  # entries per step of the search for where the scans cross inside a window


def _stops(v: torch.Tensor, p: torch.Tensor, f: int, e: int, left: bool) -> Iterator[torch.Tensor]:
    """The positions in ``[f, e)`` where the left scan (entries ≤ p, ascending) or the right scan
    (entries ≥ p, descending) of a Hoare partition stops, window by window (values read lazily:
    a swap never touches a position the scan has yet to pass among those consumed)."""
    if left:
        for a in range(f, e, WINDOW):
            b = min(e, a + WINDOW)
            yield (v[a:b] <= p).nonzero().squeeze(1) + a
    else:
        for b in range(e, f, -WINDOW):
            a = max(f, b - WINDOW)
            yield (v[a:b] >= p).nonzero().squeeze(1).flip(0) + a


def _swaps(v: torch.Tensor, p: torch.Tensor, f: int, e: int) -> int:
    """The number of swaps of a Hoare partition of ``[f, e)`` around p: the left stops L_i
    (ascending) and right stops R_i (descending) are swapped while L_i < R_i, i.e. while the
    i-th entry ≤ p from the left has at least i + 1 entries ≥ p after it: at a left stop x,
    (left stops up to x) + (right stops up to x) ≤ (all right stops)."""
    counts = []
    for a in range(f, e, WINDOW):
        seg = v[a:min(e, a + WINDOW)]
        counts.append((a, int(torch.count_nonzero(seg <= p)), int(torch.count_nonzero(seg >= p))))
    total_ge = sum(c[2] for c in counts)
    seen = lefts = 0
    for a, nl, ng in counts:
        if seen + nl + ng > total_ge:  # the scans cross in this window: find where, by sub-windows
            seg = v[a:min(e, a + WINDOW)]
            for sa in range(0, seg.numel(), SUB):
                sub = seg[sa:sa + SUB]
                le, ge = sub <= p, sub >= p
                sl, sg = int(torch.count_nonzero(le)), int(torch.count_nonzero(ge))
                if seen + sl + sg > total_ge:
                    s = torch.cumsum(le.to(torch.int32) + ge.to(torch.int32), 0)
                    x = int(torch.searchsorted(s, total_ge - seen, right=True))
                    return lefts + int(torch.count_nonzero(le[:x]))
                seen, lefts = seen + sl + sg, lefts + sl
            raise AssertionError("the crossing window holds no crossing")
        seen, lefts = seen + nl + ng, lefts + nl
    return lefts


def _partition(v: torch.Tensor, pos: torch.Tensor, f: int, e: int, p: torch.Tensor) -> int:
    """libstdc++'s ``__unguarded_partition(f, e, pivot)`` for the order "greater first": the
    left scan passes entries > p, the right scan entries < p, stops are swapped until the scans
    cross; returns the cut (the left scan's last stop)."""
    m = _swaps(v, p, f, e)
    lefts, rights = _stops(v, p, f, e, True), _stops(v, p, f, e, False)
    lbuf = rbuf = torch.empty(0, dtype=torch.int64)
    done, last_left = 0, f - 1
    while done < m:
        while lbuf.numel() == 0:
            lbuf = next(lefts)
        while rbuf.numel() == 0:
            rbuf = next(rights)
        c = min(lbuf.numel(), rbuf.numel(), m - done)
        li, ri = lbuf[:c], rbuf[:c]
        lbuf, rbuf = lbuf[c:], rbuf[c:]
        for t in (v, pos):
            tmp = t[li].clone()
            t[li] = t[ri]
            t[ri] = tmp
        done += c
        last_left = int(li[-1])
    for a in range(last_left + 1, e, WINDOW):  # the left scan's next stop (a swapped entry at the latest)
        hit = (v[a:min(e, a + WINDOW)] <= p).nonzero()
        if hit.numel():
            return a + int(hit[0, 0])
    raise AssertionError("unguarded partition ran off its range")  # the median of three prevents it


def _median_to_first(v: torch.Tensor, pos: torch.Tensor, result: int, a: int, b: int, c: int) -> None:
    """libstdc++'s ``__move_median_to_first`` with comp(x, y) = x > y."""
    va, vb, vc = int(v[a]), int(v[b]), int(v[c])
    if va > vb:
        j = b if vb > vc else (c if va > vc else a)
    elif va > vc:
        j = a
    elif vb > vc:
        j = c
    else:
        j = b
    for t in (v, pos):
        t[[result, j]] = t[[j, result]]


def depth_limit(n: int) -> int:
    """libstdc++'s introsort depth limit, ``2·floor(log2 n)`` partitions."""
    return 2 * int(math.floor(math.log2(n))) if n > 1 else 0


def _by_sort(values: torch.Tensor, k: int) -> tuple[float, torch.Tensor]:
    """:func:`first_k` by torch's own sort of ``values`` in place (18 bytes per bf16 entry: its
    index fill allocates a second int64 array); bf16 / fp16 values compare as their float32
    copies, so the order is the float32 argsort's."""
    idx = torch.empty(values.numel(), dtype=torch.int64)
    torch.sort(values, descending=True, out=(values, idx))
    tv = values[k - 1]
    return float(tv), idx[int((values[:k] != tv).sum()):k].sort().values


def first_k(values: torch.Tensor, k: int) -> tuple[float, torch.Tensor]:
    """Of the 1-D, non-negative ``values`` (|δ|: no NaN, no -0.0), what ``torch.argsort(values.float(), descending=True)[:k]``
    selects on the CPU: ``(t, tied)``, t the k-th value in that order (every entry above it is
    selected, none below) and ``tied`` the positions (ascending, int64) of the entries equal to t
    that are selected. ``values`` is permuted in place. Where the sort would turn to heapsort on
    the range holding the boundary (its depth limit spent), ``values`` is put back in its order
    and sorted (:func:`_by_sort`)."""
    n = values.numel()
    if not 0 < k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    # non-negative floats compare as their bit patterns read as signed integers (sign bit clear):
    # integer compares, the same order as the sort's float compares
    v = values.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()])
    pos = torch.arange(n, dtype=torch.int32 if n < 2**31 else torch.int64)
    first, last = 0, n
    depth = depth_limit(n)
    while last - first > THRESHOLD and k < n:
        if depth == 0:
            restored = torch.empty_like(values)
            restored[pos.long()] = values
            values.copy_(restored)
            del restored, pos
            return _by_sort(values, k)
        depth -= 1
        _median_to_first(v, pos, first, first + 1, first + (last - first) // 2, last - 1)
        cut = _partition(v, pos, first + 1, last, v[first].clone())
        if cut == k:
            break
        if cut < k:
            first = cut  # the right part, sorted by the recursion (same depth)
        else:
            last = cut  # the left part, sorted by the loop
    else:
        if k < n:  # a range of ≤ 16 holds the boundary: the insertion sort orders it, equal entries kept in order
            order = torch.sort(v[first:last], descending=True, stable=True).indices
            v[first:last] = v[first:last][order]
            pos[first:last] = pos[first:last][order]
    top = v[:k]
    t = top.min()
    tied = pos[:k][top == t].to(torch.int64).sort().values
    return float(t.reshape(1).view(values.dtype)), tied
