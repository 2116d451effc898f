"""Heterogeneous merging (LS-Merge Algorithms 1/2): layer pairing, latent size matching and
optimal-transport alignment of a source model's latents onto the target's.

1. **Layer pairing** between depths ``n_t`` (target) and ``n_s`` (source): the proportional
   map ``i_s = round(i_t·(n_s-1)/(n_t-1))`` or an explicit list (entry ``i`` = source layer
   of target layer ``i``).
2. **Latent size matching**. A tensor of a wider model has more weights, hence more samples
   ``N`` and more latent codes than its target counterpart ``M``; the paper matches them with
   the proportional mapping ``r = n_t·N / (n_s·M)``. Here the source latents
   ``(N_s, L_s, D)`` are *resampled* to the target's ``(N_t, L_t, D)`` along the sample axis
   (and the latent-token axis when the VAEs differ there) by linear interpolation with
   aligned end points: target position ``j`` reads source position ``j·(N_s-1)/(N_t-1)``,
   the same proportional rule as the layer map, applied per tensor pair. Resampling keeps the
   order of the samples (which follows the row-major layout of the weights) and needs no fit.
   The latent width ``D`` must agree (each model may have its own VAE, with one latent_dim).
3. **OT alignment** per tensor pair, on latent-token vectors (points of dimension ``D``):
   ``gaussian`` — Bures-Wasserstein closed form ``T(x) = x·A + b`` from
   ``ot.gaussian.empirical_bures_wasserstein_mapping``; ``emd`` / ``sinkhorn`` — barycentric
   mapping ``T(x_i) = Σ_j γ_ij y_j / Σ_j γ_ij`` from ``ot.emd`` / ``ot.sinkhorn`` (log domain)
   on at most ``max_samples`` points of each side; source points outside the fitted subset
   move by the displacement of their nearest fitted point (as POT's ``transform`` does).
   Too few points for a covariance (at most ``D``): ``reg`` is scaled up and a warning
   is issued; a non-finite fit falls back to a mean shift. The output is always finite.

Then ``z = z_t + λ(T(z_s) - z_t)`` is ``lerp(z_t, T(z_s), λ)``: the aligned source latents,
of the target's shape, go into the ordinary merge operators and are decoded with the
*target's* VAE.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lsm_dist.config import check, check_choice, doc

LATENT_OT = ("gaussian", "emd", "sinkhorn")
ALIGNMENTS = ("none", *LATENT_OT, "activations")
DEPTHS = ("proportional", "cka")


@dataclass
class AlignConfig:
    method: str = doc("alignment of another model onto the target: none | gaussian | emd | sinkhorn "
                      "(the paper's: OT of source latents onto the target's, per tensor pair) | "
                      "activations (functional: match MLP units by the cosine of their activations on a "
                      "calibration text and transport the source's weights into the target's basis; "
                      "lsm_dist.merge.functional)", "none")
    reg: float = doc("gaussian: covariance regularization; sinkhorn: entropic regularization "
                     "(on the cost matrix scaled to max 1)", 1e-3)
    max_samples: int = doc("points (latent-token vectors) per side used to fit a map", 2048)
    depth: str = doc("activations: source layer per target layer: proportional | cka (the "
                     "non-decreasing map maximizing the layers' CKA)", "proportional")
    source_base: str | None = doc("activations: carry each source's task vector (source − this "
                                  "model, transported) onto the target instead of the source itself",
                                  None)
    calibration_items: int = doc("activations: items of each zoo task in the calibration text (beside "
                                 "the English text)", 200)
    max_gain: float = doc("activations: bound on a coupled pair's scale ratio (target unit RMS / "
                          "source unit RMS) around the layer's median ratio, a factor (0: unbounded; "
                          "unbounded, a unit the target uses for its massive activations multiplied a "
                          "source unit by up to 4e4)", 2.0)

    def __post_init__(self) -> None:
        check_choice(self.method, "alignment.method", ALIGNMENTS)
        check(self.reg > 0 and math.isfinite(self.reg), "alignment.reg", f"must be > 0, got {self.reg!r}")
        check(self.max_samples >= 2, "alignment.max_samples", f"must be >= 2, got {self.max_samples!r}")
        check_choice(self.depth, "alignment.depth", DEPTHS)
        check(self.calibration_items >= 0, "alignment.calibration_items", "must be >= 0")
        check(self.max_gain == 0 or (self.max_gain >= 1 and math.isfinite(self.max_gain)),
              "alignment.max_gain", f"must be 0 (unbounded) or a factor >= 1, got {self.max_gain!r}")
        check(self.source_base is None or self.method == "activations", "alignment.source_base",
              "only alignment: activations carries a task vector")

    @property
    def latent_ot(self) -> bool:
        """The paper's OT of latents (fitted per tensor pair at merge time)."""
        return self.method in LATENT_OT


# ----------------------------------------------------------------------------- layers
def proportional_layer_map(n_target: int, n_source: int) -> list[int]:
    """Source layer of each target layer: round(i_t·(n_s-1)/(n_t-1)) (half rounds up)."""
    if n_target <= 0 or n_source <= 0:
        raise ValueError(f"layer map needs positive depths, got target {n_target}, source {n_source}")
    if n_target == 1:
        return [0]
    return [int(math.floor(i * (n_source - 1) / (n_target - 1) + 0.5)) for i in range(n_target)]


def resolve_layer_map(spec: str | list[int], n_target: int, n_source: int, model: str) -> list[int]:
    """``"proportional"`` or an explicit list, validated against both depths."""
    if isinstance(spec, str):
        check_choice(spec, "layer_map", ("proportional",))
        return proportional_layer_map(n_target, n_source)
    check(len(spec) == n_target, f"layer_map[{model}]",
          f"has {len(spec)} entries; the target has {n_target} layers (one source layer per target layer)")
    bad = [i for i in spec if not (isinstance(i, int) and 0 <= i < n_source)]
    check(not bad, f"layer_map[{model}]", f"entries {bad} are not layers of {model} (0..{n_source - 1})")
    return list(spec)


# -------------------------------------------------------------------------- resampling
def resample_axis(x: torch.Tensor, size: int, axis: int = 0) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``axis`` to ``size`` entries (end points aligned)."""
    n = x.shape[axis]
    if n == size:
        return x
    if size <= 0 or n == 0:
        raise ValueError(f"cannot resample {n} entries to {size}")
    if n == 1:
        return x.expand(*[size if d == axis % x.dim() else s for d, s in enumerate(x.shape)]).clone()
    pos = torch.arange(size, dtype=torch.float64) * ((n - 1) / max(size - 1, 1))
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.double()).to(x.dtype)
    shape = [1] * x.dim()
    shape[axis] = size
    a, b = x.index_select(axis, lo), x.index_select(axis, hi)
    return a + (b - a) * frac.reshape(shape)


def match_latent_shape(z: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resample latents (N_s, L_s, D) to (N_t, L_t, D) along samples and latent tokens."""
    if tuple(z.shape) == tuple(shape):
        return z
    if z.shape[-1] != shape[-1]:
        raise ValueError(f"latent width differs: source {tuple(z.shape)} vs target {tuple(shape)}; "
                         "heterogeneous merges need VAEs with the same latent_dim")
    z = resample_axis(z, shape[0], 0)
    return resample_axis(z, shape[1], 1) if z.dim() == 3 else z


# -------------------------------------------------------------------------------- OT maps
def _subsample(x: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.shape[0] <= k:
        return x, None
    idx = torch.randperm(x.shape[0], generator=gen)[:k].sort().values
    return x[idx], idx


def gaussian_map(xs: torch.Tensor, xt: torch.Tensor, reg: float, what: str = "") -> Callable:
    """Bures-Wasserstein affine map fitted on float64 points; regularized for few points."""
    import ot

    n, d = min(xs.shape[0], xt.shape[0]), xs.shape[1]
    reg_eff = reg
    if n <= d:  # the sample covariance is singular: shrink towards a scaled identity
        scale = float((xs.var(0, unbiased=False).mean() + xt.var(0, unbiased=False).mean()) / 2)
        reg_eff = max(reg * (2 * d / max(n, 1)), 0.1 * scale if math.isfinite(scale) else 0.0)
        warnings.warn(f"gaussian alignment {what}: {n} point(s) for a {d}-dim covariance; "
                      f"regularizing with reg={reg_eff:.3g} (was {reg:g})", RuntimeWarning, stacklevel=2)
    try:
        A, b = ot.gaussian.empirical_bures_wasserstein_mapping(xs, xt, reg=reg_eff, bias=True)
        ok = bool(torch.isfinite(A).all() and torch.isfinite(b).all())
    except (np.linalg.LinAlgError, RuntimeError, ValueError):
        ok = False
    if not ok:
        warnings.warn(f"gaussian alignment {what}: covariance map is not finite; using a mean shift",
                      RuntimeWarning, stacklevel=2)
        shift = xt.mean(0, keepdim=True) - xs.mean(0, keepdim=True)
        return lambda x: x + shift
    return lambda x: x @ A + b


def plan_map(xs: torch.Tensor, xt: torch.Tensor, method: str, reg: float) -> torch.Tensor:
    """Barycentric images of ``xs`` under the EMD / Sinkhorn plan to ``xt``."""
    import ot

    a = torch.full((xs.shape[0],), 1.0 / xs.shape[0], dtype=torch.float64)
    b = torch.full((xt.shape[0],), 1.0 / xt.shape[0], dtype=torch.float64)
    M = torch.cdist(xs, xt).pow(2)
    mmax = float(M.max())
    M = M / mmax if mmax > 0 else M
    if method == "emd":
        G = ot.emd(a, b, M, numItermax=max(100_000, 20 * xs.shape[0] * xt.shape[0]))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge" for small reg: the plan is still usable
            G = ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", numItermax=2000)
    mass = G.sum(1, keepdim=True)
    images = (G @ xt) / mass.clamp_min(1e-300)
    bad = ~torch.isfinite(images).all(1) | (mass.squeeze(1) <= 0)
    return torch.where(bad.unsqueeze(1), xs, images)


def nearest_displacement(x: torch.Tensor, fit_x: torch.Tensor, fit_y: torch.Tensor,
                         block: int = 4096) -> torch.Tensor:
    """x + (fit_y - fit_x)[nearest fitted point], in blocks to bound memory."""
    out = torch.empty_like(x)
    disp = fit_y - fit_x
    for s in range(0, x.shape[0], block):
        nn = torch.cdist(x[s : s + block], fit_x).argmin(1)
        out[s : s + block] = x[s : s + block] + disp[nn]
    return out


def fit_and_apply(xs: torch.Tensor, xt: torch.Tensor, cfg: AlignConfig, gen: torch.Generator,
                  what: str = "") -> torch.Tensor:
    """Map every source point (n_s, D) towards the target distribution (n_t, D); float64."""
    if not cfg.latent_ot:
        return xs
    fs, idx = _subsample(xs, cfg.max_samples, gen)
    ft, _ = _subsample(xt, cfg.max_samples, gen)
    if cfg.method == "gaussian":
        out = gaussian_map(fs, ft, cfg.reg, what)(xs)
    else:
        images = plan_map(fs, ft, cfg.method, cfg.reg)
        out = images if idx is None else nearest_displacement(xs, fs, images)
    if not torch.isfinite(out).all():  # never hand NaN to the decoder
        warnings.warn(f"{cfg.method} alignment {what}: non-finite map; source latents left unaligned",
                      RuntimeWarning, stacklevel=2)
        return xs
    return out


def align_latents(z_s: torch.Tensor, z_t: torch.Tensor, cfg: AlignConfig, gen: torch.Generator,
                  what: str = "") -> torch.Tensor:
    """Source latents (N_s, L_s, D) → aligned latents of the target's shape (N_t, L_t, D).

    Points are latent-token vectors; the map is fitted and applied in float64, then the mapped
    latents are resampled to the target's sample / token counts (:func:`match_latent_shape`).
    """
    D = z_t.shape[-1]
    if z_s.shape[-1] != D:
        raise ValueError(f"{what}: latent width {z_s.shape[-1]} differs from the target's {D}; "
                         "heterogeneous merges need VAEs with the same latent_dim")
    xs = z_s.reshape(-1, D).double()
    xt = z_t.reshape(-1, D).double()
    mapped = fit_and_apply(xs, xt, cfg, gen, what).reshape(z_s.shape)
    return match_latent_shape(mapped, tuple(z_t.shape)).to(torch.float32)
