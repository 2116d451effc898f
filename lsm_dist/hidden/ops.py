"""Mixing operators on hidden states (the "latent merging" of the second seed paper).

Every operator maps the per-model hidden states ``hs = [h_0, ..., h_{N-1}]`` (same shape
``(..., d)``) at one layer and a mixing ratio ``α ∈ [0, 1]`` to one state. The model weights
are ``w = mix_weights(N, α) = (1 − α, α/(N−1), ..., α/(N−1))``: model 0 is the "anchor" and
``α`` the share given to the others (for two models, ``h = (1 − α) h_a + α h_b``).

* ``lerp``    ``h = Σ_i w_i h_i``.
* ``slerp``   two models only, per token vector: the direction moves along the great circle
  from ``u_a = h_a/‖h_a‖`` to ``u_b`` by the fraction α of the angle
  ``θ = arccos(u_a·u_b)``, the norm is interpolated linearly:
  ``h = ((1−α)‖h_a‖ + α‖h_b‖) · (sin((1−α)θ) u_a + sin(αθ) u_b) / sin θ``.
  Where ``θ < eps`` or ``π − θ < eps`` (nearly parallel / antiparallel: ``sin θ ≈ 0``) or a
  norm is ~0, the token falls back to ``lerp``.
* ``regmean`` a regularized mean weighted by each model's second moments (see ``RegMean``).

``α = 0`` returns ``h_0`` itself for every operator (bit-exact), and ``α = 1`` with two
models returns ``h_1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lsm_dist.merge.operators import weighted_sum
from lsm_dist.merge.spherical import slerp_norm_vectors

OPS = ("lerp", "slerp", "regmean")


def mix_weights(n: int, alpha: float) -> list[float]:
    """``(1 − α, α/(n−1), ...)``: model 0 keeps ``1 − α``, the others share ``α`` equally."""
    if n < 2:
        raise ValueError(f"need at least two models to mix, got {n}")
    return [1.0 - alpha] + [alpha / (n - 1)] * (n - 1)


def lerp(hs: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``Σ_i w_i h_i`` (float32), by the merge operators' weighted sum."""
    return weighted_sum([h.float() for h in hs], mix_weights(len(hs), alpha))


def slerp(h_a: torch.Tensor, h_b: torch.Tensor, alpha: float, eps: float = 1e-4) -> torch.Tensor:
    """Per-vector SLERP of direction with linear interpolation of norm (float32 result): the
    ``slerp_norm`` merge operator's formula (``lsm_dist.merge.spherical``)."""
    return slerp_norm_vectors(h_a.float(), h_b.float(), alpha, eps)


class GramStats:
    """Running second moments of hidden states, per model and layer (RegMean calibration).

    ``add(model, layer, h, mask)`` accumulates ``Σ h hᵀ`` (``full``) or ``Σ h²`` (diagonal)
    over the tokens where ``mask`` is 1, in float64; ``gram(model, layer)`` is the mean.
    """

    def __init__(self, full: bool = True):
        self.full = full
        self._sum: dict[tuple[int, int], torch.Tensor] = {}
        self._count: dict[tuple[int, int], int] = {}

    def add(self, model: int, layer: int, h: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = h.detach().reshape(-1, h.shape[-1]).double()
        if mask is not None:
            x = x[mask.reshape(-1).bool()]
        s = x.T @ x if self.full else (x * x).sum(0)
        key = (model, layer)
        self._sum[key] = self._sum[key] + s if key in self._sum else s
        self._count[key] = self._count.get(key, 0) + x.shape[0]

    def has(self, model: int, layer: int) -> bool:
        return self._count.get((model, layer), 0) > 0

    def gram(self, model: int, layer: int) -> torch.Tensor:
        key = (model, layer)
        if not self.has(model, layer):
            raise KeyError(f"no calibration statistics for model {model}, layer {layer}")
        return self._sum[key] / self._count[key]

    def layers(self) -> set[int]:
        return {layer for (_, layer), n in self._count.items() if n > 0}


class RegMean:
    """Hidden-state RegMean for one layer, precomputed for fixed weights ``w``.

    RegMean (Jin et al., 2023) merges a linear map by the closed form minimizing
    ``Σ_i ‖X_i W − X_i W_i‖²`` , i.e. ``W = (Σ G_i)⁻¹ Σ G_i W_i`` with ``G_i = X_iᵀ X_i``.
    A hidden state is not a linear map, so the closed form is applied to the state itself:
    the merged ``h`` minimizes the sum of the models' errors, each measured in the metric of
    that model's own second moments ``G_i = E[h_i h_iᵀ]`` at this layer (calibration text),

        h* = argmin_h Σ_i w_i (h − h_i)ᵀ Ĝ_i (h − h_i) = (Σ_i w_i Ĝ_i)⁻¹ Σ_i w_i Ĝ_i h_i,

    so each direction of the residual stream is taken mostly from the model(s) that carry
    energy along it (a feature one expert amplified is kept rather than halved). Regularized
    as in RegMean, plus a ridge inside each ``G_i`` (so identical states give back exactly
    that state, whatever ``Ĝ_i``):

        full:      Ĝ_i = γ G_i + (1 − γ) Diag(G_i) + λ · (tr G_i / d) · I
        diagonal:  ĝ_i = diag(G_i) + λ · mean(diag G_i)          (then h* = Σ w_i ĝ_i ⊙ h_i / Σ w_i ĝ_i)

    ``γ`` = ``shrink`` (RegMean's off-diagonal scaling), ``λ`` = ``ridge``. Precomputed:
    ``M_i = (Σ_j w_j Ĝ_j)⁻¹ w_i Ĝ_i`` so that ``h* = Σ_i M_i h_i`` (one d×d product per model).
    """

    def __init__(self, grams: Sequence[torch.Tensor], weights: Sequence[float], full: bool,
                 shrink: float = 0.9, ridge: float = 1e-3):  # fmt: skip
        self.full = full
        reg = []
        for g in grams:
            g = g.double()
            if full:
                d = g.shape[0]
                diag = torch.diagonal(g)
                gh = shrink * g + (1 - shrink) * torch.diag(diag)
                gh = gh + ridge * (diag.sum() / d).clamp_min(1e-30) * torch.eye(d, dtype=g.dtype)
            else:
                gh = g + ridge * g.mean().clamp_min(1e-30)
            reg.append(gh)
        if full:
            total = sum(w * g for w, g in zip(weights, reg))
            self.mats = [torch.linalg.solve(total, w * g).T.float().contiguous()
                         for w, g in zip(weights, reg)]  # fmt: skip  # h @ M_iᵀ
        else:
            total = sum(w * g for w, g in zip(weights, reg))
            self.mats = [(w * g / total).float() for w, g in zip(weights, reg)]

    def __call__(self, hs: Sequence[torch.Tensor]) -> torch.Tensor:
        out = None
        for m, h in zip(self.mats, hs):
            m = m.to(h.device)
            term = h.float() @ m if self.full else h.float() * m
            out = term if out is None else out + term
        return out
