"""Spherical merge operators: slerp (and its norm-interpolating variant), nuslerp, multislerp,
karcher, model_stock. Registered in :mod:`lsm_dist.merge.operators`; each works on any tensor
shape, so the same code merges weights and latents.

Granularity (``params.granularity``): ``tensor`` treats the whole tensor as one vector;
``vector`` takes one vector per entry of the leading axes (along the last axis: a latent
token, a weight row); ``column`` (nuslerp) one vector along the first axis.

- ``slerp``: θ = angle between a and b (from their normalized copies), z = sin((1-λ)θ)/sin θ · a
  + sin(λθ)/sin θ · b on the unnormalized inputs; LERP where |cos θ| > 0.9995. Coefficients
  are float32, as in mergekit (a (near-)zero norm counts as 1 there, not as a fallback).
- ``slerp_norm`` (the hidden-state paper's): the *direction* follows the great circle and the
  norm is interpolated linearly, ‖z‖ = (1-λ)‖a‖ + λ‖b‖; LERP where θ or π-θ < ``eps`` radians
  or a norm is ~0. ``lsm_dist.hidden`` mixes hidden states and builds its weight baselines
  with it.
- ``nuslerp``: slerp with λ = w_1 / (w_0 + w_1) from the two inputs' weights, of the task
  vectors when a base is given; LERP where 1 - cos²θ ≤ 1e-16.
- ``multislerp``: barycentric interpolation on the hypersphere: unit vectors, tangent space at
  their weighted mean direction, weighted tangent mean, exponential map back, times the
  weighted mean norm (task vectors when a base is given).
- ``karcher``: weighted Karcher (Fréchet) mean of the directions on the unit sphere by a fixed
  point iteration (``max_iter``, ``tol``), times the weighted mean norm.
- ``model_stock``: t = N·cos θ̄ / (1 + (N-1)·cos θ̄) with cos θ̄ the mean pairwise cosine of
  the inputs' offsets from the base; z = t·mean(inputs) + (1-t)·base (the base where the
  denominator vanishes).
"""

from __future__ import annotations

import math

import torch

from lsm_dist.config import check
from lsm_dist.merge.operators import (
    DOT_THRESHOLD,
    OPERATORS,
    MergeParams,
    register_operator,
    resolve_weights,
)


def as_vectors(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """``(n, d)`` view of ``x``: one row (tensor), rows along the last axis (vector) or
    columns (column: vectors along the first axis)."""
    if granularity == "tensor" or x.dim() == 0:
        return x.reshape(1, -1)
    if granularity == "column" and x.dim() >= 2:
        return x.reshape(x.shape[0], -1).T
    return x.reshape(-1, x.shape[-1])


def from_vectors(v: torch.Tensor, like: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity == "column" and like.dim() >= 2:
        return v.T.reshape(like.shape)
    return v.reshape(like.shape)


def slerp_vectors(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """SLERP row by row of (n, d) matrices with float32 coefficients; LERP for near-(anti)parallel rows."""
    tt = torch.tensor(t, dtype=a.dtype)
    na, nb = torch.linalg.vector_norm(a, dim=1, keepdim=True), torch.linalg.vector_norm(b, dim=1, keepdim=True)
    na, nb = torch.where(na > eps, na, 1), torch.where(nb > eps, nb, 1)
    dot = ((a / na) * (b / nb)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin = torch.sin(theta)
    ca = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin)
    cb = torch.where(linear, tt, torch.sin(tt * theta) / sin)
    return ca * a + cb * b


@register_operator("slerp", min_inputs=2, max_inputs=2)
def slerp(xs, p: MergeParams, **_) -> torch.Tensor:
    """Spherical interpolation per tensor or per vector (see module doc)."""
    a, b = xs
    g = "tensor" if p.granularity == "column" else p.granularity
    return from_vectors(slerp_vectors(as_vectors(a, g), as_vectors(b, g), p.lambda_), a, g)


def slerp_norm_vectors(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-4) -> torch.Tensor:
    """Direction by SLERP, norm by LERP, per vector along the last axis (any leading shape)."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    tiny = torch.finfo(a.dtype).tiny
    ua, ub = a / na.clamp_min(tiny), b / nb.clamp_min(tiny)
    theta = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    flat = (theta < eps) | (math.pi - theta < eps) | (na <= tiny) | (nb <= tiny)
    sin = torch.where(flat, torch.ones_like(theta), torch.sin(theta))
    direction = (torch.sin((1 - t) * theta) * ua + torch.sin(t * theta) * ub) / sin
    out = ((1 - t) * na + t * nb) * direction
    return torch.where(flat, (1 - t) * a + t * b, out)


@register_operator("slerp_norm", min_inputs=2, max_inputs=2)
def slerp_norm(xs, p: MergeParams, **_) -> torch.Tensor:
    """Hidden-state paper's SLERP: great-circle direction, linearly interpolated norm."""
    a, b = xs
    g = "tensor" if p.granularity == "column" else p.granularity
    return from_vectors(slerp_norm_vectors(as_vectors(a, g), as_vectors(b, g), p.lambda_, p.eps), a, g)


@register_operator("nuslerp", min_inputs=2, max_inputs=2, base="optional", weights="scale", native_dtype=True)
def nuslerp(xs, p: MergeParams, base: torch.Tensor | None = None, **_) -> torch.Tensor:
    """SLERP at λ = w_1/(w_0+w_1), of the task vectors when a base is given (mergekit's nuslerp)."""
    w = resolve_weights(OPERATORS["nuslerp"], p, 2)
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    a, b = (xs[0] - base, xs[1] - base) if base is not None else (xs[0], xs[1])
    va, vb = as_vectors(a, p.granularity), as_vectors(b, p.granularity)
    ua = va / va.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = vb / vb.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * va + torch.sin(t * theta) * vb) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * va + t * vb, out)
    out = from_vectors(out, a, p.granularity)
    return out + base if base is not None else out


@register_operator("multislerp", min_inputs=1, base="optional", weights="scale", native_dtype=True)
def multislerp(xs, p: MergeParams, base: torch.Tensor | None = None, **_) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (tangent space at the weighted mean direction)."""
    if len(xs) == 1:
        return xs[0].clone()
    eps = 1e-8
    x = torch.stack(xs)
    if base is not None:
        x = x - base
    flat = x.reshape(len(xs), -1)
    w = torch.tensor(resolve_weights(OPERATORS["multislerp"], p, len(xs)), dtype=x.dtype)
    if p.normalize is not False:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(xs) != 2:
            raise ValueError("multislerp: the weighted mean direction is zero (antipodal inputs with "
                             "balancing weights); use other weights")
        out = (x[0] * w[0] + x[1] * w[1])
    else:
        mean = mean / mean_norm
        tangent = units - (units * mean).sum(-1, keepdim=True) * mean
        step = (tangent * w.view(-1, 1)).sum(0)
        step_norm = step.norm() + eps
        out = (mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm))
        out = (out * (norms.squeeze(-1) * w).sum()).reshape(x.shape[1:])
    return out + base if base is not None else out


@register_operator("karcher", min_inputs=1, weights="scale", native_dtype=True)
def karcher(xs, p: MergeParams, **_) -> torch.Tensor:
    """Karcher mean of the directions on the unit sphere, scaled by the weighted mean norm
    (norms in float32, directions in the inputs' dtype, as mergekit)."""
    if len(xs) == 1:
        return xs[0].clone()
    f32 = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    w = resolve_weights(OPERATORS["karcher"], p, len(xs)) if p.weights is not None else [1.0 / len(xs)] * len(xs)
    norms = [torch.linalg.vector_norm(x.to(f32)) for x in xs]
    valid = [i for i, n in enumerate(norms) if float(n) > p.tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(w[i] for i in valid)
    check(abs(total) > 1e-12, "params.weights", "the weights of the non-zero inputs sum to 0")
    alphas = [w[i] / total for i in valid]
    units = [(xs[i] / norms[i]).to(xs[i].dtype) for i in valid]
    mean = torch.zeros_like(units[0])
    for a, u in zip(alphas, units):
        mean += a * u
    mn = torch.linalg.vector_norm(mean.to(f32))
    mean = units[0].clone() if float(mn) < p.tol else (mean / mn).to(mean.dtype)
    for _ in range(p.max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, units):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < p.tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent.to(f32))
        if float(tn) < p.tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        un = torch.linalg.vector_norm(mean.to(f32))
        if float(un) > p.tol:
            mean = (mean / un).to(mean.dtype)
    return sum(wi * n for wi, n in zip(w, norms)) * mean


@register_operator("model_stock", min_inputs=2, needs_base=True, native_dtype=True)
def model_stock(xs, p: MergeParams, base: torch.Tensor, **_) -> torch.Tensor:
    """Model Stock: interpolate between the inputs' mean and the base by their offsets' mean cosine."""
    g = "vector" if p.granularity != "tensor" else "tensor"
    b = base.unsqueeze(0) if (g == "vector" and base.dim() == 1) else base
    b = b.reshape(-1) if g == "tensor" else b
    ws = [(x.unsqueeze(0) if (g == "vector" and x.dim() == 1) else x) for x in xs]
    ws = [w.reshape(-1) for w in ws] if g == "tensor" else ws
    offsets = [w - b for w in ws]
    cos = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            denom = (torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)).clamp(min=1e-6)
            cos.append(((oa * ob).sum(dim=-1) / denom).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(denom), denom))
    return (t * (sum(ws) / n) + (1 - t) * b).reshape(base.shape)
