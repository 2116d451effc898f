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

Random masks come from the operator's generator (seeded by the plan's seed and the tensor
name), one uniform draw per entry and input, so a merge is reproducible on any rank.
"""

from __future__ import annotations

import torch

from lsm_dist.merge.operators import (
    OPERATORS,
    MergeParams,
    per_input,
    register_operator,
    resolve_weights,
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
                 density: list[float] | None = None) -> torch.Tensor:
    """Steps 1-5 of the module doc for method ``name``."""
    op = OPERATORS[name]
    n = len(xs)
    w = torch.tensor(resolve_weights(op, p, n), dtype=base.dtype)
    dens = density if density is not None else (per_input(p, "density", n) if how else [1.0] * n)
    gam = per_input(p, "gamma", n) if how == "outliers" else [0.0] * n
    eps = per_input(p, "epsilon", n) if how == "della" else [0.0] * n
    rescale = p.rescale or ("inverse" if how in ("random", "della") else "none")
    deltas = base.new_empty((n, *base.shape))
    for i, x in enumerate(xs):
        deltas[i] = sparsify(x - base, how, dens[i], rescale, gen, gam[i], eps[i])
    wv = w.reshape(n, *([1] * base.dim()))
    deltas.mul_(wv)
    if consensus:
        signs = deltas.sign()
        total = deltas.sum(dim=0)
        elected = torch.where(total >= 0, 1.0, -1.0) if p.sign_tie == "positive" else total.sign()
        mask = ((signs == elected) & (signs != 0)).to(base.dtype)
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
    return base + mixed


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

    def fn(xs, p: MergeParams, base: torch.Tensor, gen: torch.Generator, **_) -> torch.Tensor:
        dens = [1.0 - p.drop_p] * len(xs) if name == "dare" else None
        return merge_deltas(name, xs, p, base, gen, how, consensus, norm, density=dens)

    fn.__doc__ = DOCS[name]
    register_operator(name, min_inputs=1, needs_base=True, weights="scale", per_input=extra,
                      native_dtype=True)(fn)


for _name in FAMILY:
    _register(_name)
