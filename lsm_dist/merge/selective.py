"""mergekit's selective merges -- SCE, RAM, RAM+ (tensor-local), NearSwap and Arcee Fusion --
written from mergekit 0.1.5's definitions (``mergekit/merge_methods/{sce,ram,nearswap,
arcee_fusion}.py``) and registered like every operator, so each runs in weight space and on
latents. All take a base and compute in the inputs' dtype when asked (mergekit's arithmetic).

- ``sce``: task vectors δ_i = x_i − base; with ``select_topk`` < 1 only the entries of highest
  variance across the inputs are kept; signs elected by the sum of the deltas; each input weighted
  by its mean squared delta; base + the weighted mean of the agreeing deltas.
- ``ram``: entries whose |δ| > ``ram_epsilon`` count as contributions; an entry one input
  changes keeps that change, one several inputs change gets their mean.
- ``ramplus_tl``: RAM with each input's unique changes scaled by ``1 + r·clamp(ρ, 0, alpha)``,
  ρ = its shared / unique contribution counts in the tensor.
- ``nearswap`` (base + one input): ``w = clamp(t / |base − x|, 0, 1)``; ``w·x + (1 − w)·base``:
  where the two are within ``nearswap_t`` of each other, the input's value.
- ``arcee_fusion`` (base + one input): importance = |x − base| × KL(softmax(x) ‖ softmax(base))
  per row; the delta is kept where the importance reaches median + 1.5 IQR (quantiles of at most
  10⁶ entries, sampled with the operator's seeded generator above that).
"""

from __future__ import annotations

import torch

from lsm_dist.merge.operators import MergeParams, register_operator

QUANTILE_SAMPLE = 1_000_000  # arcee_fusion: quantiles of at most this many entries (mergekit's)


def _sign_mask(delta: torch.Tensor) -> torch.Tensor:
    """TIES sign election by the sum (mergekit's ``get_mask(method="sum")``)."""
    sign = delta.sign().to(delta.dtype)
    majority = (delta.sum(dim=0) >= 0).to(delta.dtype) * 2 - 1
    return sign == majority


@register_operator("sce", min_inputs=1, needs_base=True, native_dtype=True)
def sce(xs, p: MergeParams, base: torch.Tensor, **_) -> torch.Tensor:
    """SCE: select by variance (select_topk), weight by mean squared delta, elect signs, mean."""
    tv = torch.stack([x - base for x in xs], dim=0)
    if p.select_topk < 1:
        tv = tv * _variance_mask(tv, p.select_topk).unsqueeze(0)
    erase = _sign_mask(tv)
    w = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
    while w.dim() < tv.dim():
        w = w.unsqueeze(-1)
    ew = w * erase
    merged = (tv * ew).sum(dim=0) / torch.sum(ew, dim=0).clamp(min=1e-6)
    return base + merged


def _variance_mask(tv: torch.Tensor, density: float) -> torch.Tensor:
    if density <= 0:
        return torch.zeros_like(tv[0])
    var = torch.var(tv, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[idx] = 1
    return mask


def _ram_parts(xs, base: torch.Tensor, eps: float):
    tv = torch.stack([x - base for x in xs], dim=0).view(len(xs), -1)
    nonzero = tv.abs() > eps
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


@register_operator("ram", min_inputs=1, needs_base=True, native_dtype=True)
def ram(xs, p: MergeParams, base: torch.Tensor, **_) -> torch.Tensor:
    """RAM: a change one input makes is kept; one several make is averaged."""
    tv, nonzero, counts, overlap, unique = _ram_parts(xs, base, p.ram_epsilon)
    z = tv * nonzero
    merged = ((z * unique) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@register_operator("ramplus_tl", min_inputs=1, needs_base=True, native_dtype=True, promotes=True)
def ramplus_tl(xs, p: MergeParams, base: torch.Tensor, **_) -> torch.Tensor:
    """RAM+ (tensor-local): unique changes scaled by 1 + r·clamp(shared/unique, 0, alpha)."""
    tv, nonzero, counts, overlap, unique = _ram_parts(xs, base, p.ram_epsilon)
    shared_n = (nonzero & overlap).sum(dim=1)
    unique_n = (nonzero & unique).sum(dim=1)
    rho = shared_n / unique_n.clamp(min=p.ram_epsilon)
    lam = 1 + p.ram_r * rho.clamp(min=0, max=p.ram_alpha)
    z = tv * nonzero
    merged = ((z * unique * lam.unsqueeze(-1)) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@register_operator("nearswap", min_inputs=1, max_inputs=1, needs_base=True, native_dtype=True)
def nearswap(xs, p: MergeParams, base: torch.Tensor, **_) -> torch.Tensor:
    """NearSwap: the input's value where it is within nearswap_t of the base's."""
    b = xs[0]
    weight = (p.nearswap_t / torch.abs(base - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * base


@register_operator("arcee_fusion", min_inputs=1, max_inputs=1, needs_base=True, native_dtype=True, promotes=True)
def arcee_fusion(xs, p: MergeParams, base: torch.Tensor, gen: torch.Generator, **_) -> torch.Tensor:
    """Arcee Fusion: the delta where its importance passes median + 1.5 IQR."""
    x = xs[0]
    diff = (x - base).abs()
    eps = 1e-8
    pp = torch.nn.functional.softmax(x, dim=-1) + eps
    qq = torch.nn.functional.softmax(base, dim=-1) + eps
    importance = diff * torch.sum(pp * torch.log(pp / qq), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=gen)]
    srt, _ = torch.sort(flat)
    q = (torch.tensor([0.25, 0.5, 0.75]) * (srt.numel() - 1)).long()
    q1, med, q3 = srt[q]
    mask = (importance >= med + 1.5 * (q3 - q1)).float()  # a float32 mask, as mergekit's (the sum promotes)
    return base + (x - base) * mask
