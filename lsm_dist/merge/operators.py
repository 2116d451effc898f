"""Merge operators on tensors: the same code merges latent tensors (LS-Merge) and weight
tensors (the weight-space baselines).

Every operator takes a list of input tensors of one shape (``xs``), optionally a ``base``
tensor (task arithmetic / TIES / DARE work on deltas ``x - base``) and optionally the inputs'
log-variances (``self_merge``), and returns one float32 tensor of the same shape. Operators
register with :func:`register_operator`; :func:`get_operator` on an unknown name fails
listing the known ones. Parameters live in :class:`MergeParams` (the ``params:`` mapping of a
merge plan); each operator validates the ones it uses with a message naming the field.

SLERP granularity (``params.granularity``):

- ``tensor`` (default, as mergekit): the whole tensor is one flattened vector; one angle.
- ``vector``: one SLERP per vector along the last axis. On latents of shape
  ``(samples, latent_tokens, latent_dim)`` that is one SLERP per *latent token* (each token
  code is a point of the latent space); on a weight matrix it is one per row.

A pair whose normalized dot product exceeds ``0.9995`` in absolute value (angle near 0 or π),
or where a vector is (near) zero, falls back to LERP, where SLERP is numerically unstable.

Randomness (DARE masks, self-merge posterior samples) comes from :func:`make_generator`
seeded by ``(params.seed, key)`` where the caller passes the tensor name as ``key``, so a
result does not depend on which rank merges which tensor or in what order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lsm_dist.config import ConfigError, check, check_choice, doc

DOT_THRESHOLD = 0.9995
GRANULARITIES = ("tensor", "vector")


@dataclass
class MergeParams:
    """Parameters of the merge operators (YAML key ``lambda`` is field ``lambda_``)."""

    lambda_: float = doc(
        "λ (YAML / override key `lambda`) ∈ [0, 1]: lerp/slerp z = (1-λ)·z_0 + λ·z_1 (λ=0 gives the first input, by default "
        "the target); heterogeneous merges: z = z_t + λ(T(z_s) - z_t)", 0.5)
    weights: list[float] | None = doc(
        "per-input weights, in the order of `inputs`: soup (must sum to 1 unless normalize), "
        "task_arithmetic / ties / dare (scale of each delta; default 1.0 each)", None)
    normalize: bool = doc("divide the weights by their sum instead of requiring them to sum to 1", False)
    density: float = doc("TIES: fraction of each delta kept (largest |delta|), in (0, 1]", 0.5)
    drop_p: float = doc("DARE: drop probability p ∈ [0, 1); kept entries are scaled by 1/(1-p)", 0.5)
    samples: int = doc("self_merge: number K of posterior samples z = mu + sigma·eps averaged", 8)
    seed: int = doc("seed for DARE masks, self_merge samples and OT subsampling", 0)
    granularity: str = doc("slerp: 'tensor' (one flattened vector) or 'vector' (per latent token / row)", "tensor")
    noise: float = doc("noise: relative MSE of the Gaussian noise added (noise std = sqrt(noise) · the "
                       "tensor's std)", 0.01)

    def __post_init__(self) -> None:
        lam = self.lambda_
        check(isinstance(lam, (int, float)) and math.isfinite(lam) and 0.0 <= lam <= 1.0,
              "params.lambda", f"must be in [0, 1], got {lam!r}")
        check(0.0 < self.density <= 1.0, "params.density", f"must be in (0, 1], got {self.density!r}")
        check(0.0 <= self.drop_p < 1.0, "params.drop_p", f"must be in [0, 1), got {self.drop_p!r}")
        check(isinstance(self.samples, int) and self.samples >= 1, "params.samples",
              f"must be a positive integer, got {self.samples!r}")
        check_choice(self.granularity, "params.granularity", GRANULARITIES)
        check(isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and self.noise >= 0,
              "params.noise", f"must be a finite number >= 0, got {self.noise!r}")
        if self.weights is not None:
            check(len(self.weights) > 0, "params.weights", "must not be empty")
            check(all(math.isfinite(w) for w in self.weights), "params.weights",
                  f"must be finite numbers, got {self.weights}")


OpFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Operator:
    name: str
    fn: OpFn
    needs_base: bool = False
    needs_logvar: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    latent_only: bool = False
    weights: str = "none"  # none | sum_to_one | scale
    doc: str = ""

    def validate(self, params: MergeParams, n_inputs: int, has_base: bool) -> None:
        """Check arity, base and weights for ``n_inputs`` inputs (messages name the field)."""
        lo, hi = self.min_inputs, self.max_inputs
        want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo}..{hi}")
        check(n_inputs >= lo and (hi is None or n_inputs <= hi), "inputs",
              f"method {self.name!r} takes {want} input model(s), got {n_inputs}")
        if self.needs_base:
            check(has_base, "base", f"method {self.name!r} merges deltas from a base model: set `base`")
        resolve_weights(self, params, n_inputs)


OPERATORS: dict[str, Operator] = {}


def register_operator(name: str, **props) -> Callable[[OpFn], OpFn]:
    """Decorator: register ``fn(xs, params, base, logvars, gen) -> Tensor`` under ``name``."""

    def deco(fn: OpFn) -> OpFn:
        if name in OPERATORS:
            raise ValueError(f"merge operator {name!r} is already registered")
        OPERATORS[name] = Operator(name, fn, doc=(fn.__doc__ or "").strip().split("\n")[0], **props)
        return fn

    return deco


def get_operator(name: str) -> Operator:
    op = OPERATORS.get(name)
    if op is None:
        raise ConfigError(f"method: unknown merge operator {name!r}; known operators: {sorted(OPERATORS)}")
    return op


def resolve_weights(op: Operator, params: MergeParams, n: int) -> list[float]:
    """The per-input weights an operator uses (validated; normalized if asked)."""
    if op.weights == "none":
        return []
    w = params.weights
    if w is None:
        return [1.0 / n] * n if op.weights == "sum_to_one" else [1.0] * n
    check(len(w) == n, "params.weights", f"has {len(w)} value(s) but method {op.name!r} has {n} input(s)")
    total = float(sum(w))
    if params.normalize:
        check(abs(total) > 1e-12, "params.weights", f"sum to {total}; cannot normalize by a zero sum")
        return [float(x) / total for x in w]
    if op.weights == "sum_to_one":
        check(abs(total - 1.0) <= 1e-6, "params.weights",
              f"{list(w)} sum to {total:g}, must sum to 1 (or set params.normalize: true)")
    return [float(x) for x in w]


def make_generator(seed: int, key: str = "") -> torch.Generator:
    """A CPU generator seeded from ``(seed, key)`` (stable across processes and runs)."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def apply_operator(
    name: str,
    xs: Sequence[torch.Tensor],
    params: MergeParams | None = None,
    base: torch.Tensor | None = None,
    logvars: Sequence[torch.Tensor] | None = None,
    key: str = "",
) -> torch.Tensor:
    """Validate and run operator ``name``; inputs are cast to float32, output is float32."""
    params = params or MergeParams()
    op = get_operator(name)
    op.validate(params, len(xs), base is not None)
    shape = tuple(xs[0].shape)
    for i, x in enumerate(xs):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: input {i} has shape {tuple(x.shape)}, input 0 has {shape} ({key})")
    if base is not None and tuple(base.shape) != shape:
        raise ValueError(f"{name}: base has shape {tuple(base.shape)}, inputs have {shape} ({key})")
    if op.needs_logvar and (logvars is None or len(logvars) != len(xs)):
        raise ValueError(f"{name}: needs the log-variances of its inputs (latent space only) ({key})")
    xs = [x.float() for x in xs]
    base = base.float() if base is not None else None
    lv = [v.float() for v in logvars] if logvars is not None else None
    return op.fn(xs, params, base=base, logvars=lv, gen=make_generator(params.seed, key))


# ---------------------------------------------------------------------------- operators
@register_operator("lerp", min_inputs=2, max_inputs=2)
def lerp(xs, p: MergeParams, **_) -> torch.Tensor:
    """Linear interpolation z = (1-λ)·z_0 + λ·z_1."""
    return torch.lerp(xs[0], xs[1], p.lambda_)


def slerp_vectors(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """SLERP row by row of (n, d) matrices; LERP fallback for near-(anti)parallel or zero rows."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    dot = ((a / na.clamp_min(eps)) * (b / nb.clamp_min(eps))).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    fallback = (dot.abs() > DOT_THRESHOLD) | (na < eps) | (nb < eps)
    theta = torch.acos(dot)
    sin = torch.sin(theta).masked_fill(fallback, 1.0)
    s0, s1 = torch.sin((1 - t) * theta) / sin, torch.sin(t * theta) / sin
    return torch.where(fallback, torch.lerp(a, b, t), s0 * a + s1 * b)


@register_operator("slerp", min_inputs=2, max_inputs=2)
def slerp(xs, p: MergeParams, **_) -> torch.Tensor:
    """Spherical interpolation per tensor or per vector (see module doc)."""
    a, b = xs
    shape = a.shape
    if p.granularity == "tensor" or a.dim() == 0:
        a2, b2 = a.reshape(1, -1), b.reshape(1, -1)
    else:
        a2, b2 = a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])
    return slerp_vectors(a2, b2, p.lambda_).reshape(shape)


@register_operator("soup", min_inputs=1, weights="sum_to_one")
def soup(xs, p: MergeParams, **_) -> torch.Tensor:
    """Weighted mean Σ w_i z_i (uniform weights by default)."""
    w = resolve_weights(OPERATORS["soup"], p, len(xs))
    out = torch.zeros_like(xs[0])
    for wi, x in zip(w, xs):
        out.add_(x, alpha=wi)
    return out


@register_operator("task_arithmetic", min_inputs=1, needs_base=True, weights="scale")
def task_arithmetic(xs, p: MergeParams, base: torch.Tensor, **_) -> torch.Tensor:
    """base + Σ w_i (z_i - base)."""
    w = resolve_weights(OPERATORS["task_arithmetic"], p, len(xs))
    out = base.clone()
    for wi, x in zip(w, xs):
        out.add_(x - base, alpha=wi)
    return out


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density·numel)`` (at least 1) entries of largest magnitude, zero the rest."""
    flat = delta.reshape(-1)
    k = max(1, min(flat.numel(), int(round(density * flat.numel()))))
    if k == flat.numel():
        return delta.clone()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)


@register_operator("ties", min_inputs=1, needs_base=True, weights="scale")
def ties(xs, p: MergeParams, base: torch.Tensor, **_) -> torch.Tensor:
    """TIES: trim deltas to `density`, elect the sign of Σ w_i δ_i, disjoint (weighted) mean."""
    w = resolve_weights(OPERATORS["ties"], p, len(xs))
    trimmed = [trim_to_density(x - base, p.density) for x in xs]
    elected = torch.sign(sum(wi * d for wi, d in zip(w, trimmed)))
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for wi, d in zip(w, trimmed):
        agree = ((torch.sign(d) == elected) & (d != 0)).to(base.dtype)
        num.add_(d * agree, alpha=wi)
        den.add_(agree, alpha=wi)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return base + num / den


@register_operator("dare", min_inputs=1, needs_base=True, weights="scale")
def dare(xs, p: MergeParams, base: torch.Tensor, gen: torch.Generator, **_) -> torch.Tensor:
    """DARE: drop delta entries with probability p, rescale by 1/(1-p), then base + Σ w_i δ̃_i."""
    w = resolve_weights(OPERATORS["dare"], p, len(xs))
    out = base.clone()
    scale = 1.0 / (1.0 - p.drop_p)
    for wi, x in zip(w, xs):
        keep = torch.rand(x.shape, generator=gen) >= p.drop_p
        out.add_((x - base) * keep.to(x.dtype), alpha=wi * scale)
    return out


@register_operator("self_merge", min_inputs=1, max_inputs=1, needs_logvar=True, latent_only=True)
def self_merge(xs, p: MergeParams, logvars, gen: torch.Generator, **_) -> torch.Tensor:
    """Mean of K posterior samples z_k = mu + sigma·eps_k of one model (latent space only)."""
    mu, logvar = xs[0], logvars[0]
    acc = torch.zeros_like(mu)
    for _ in range(p.samples):
        acc.add_(torch.randn(mu.shape, generator=gen))
    return mu + torch.exp(0.5 * logvar) * (acc / p.samples)


@register_operator("noise", min_inputs=1, max_inputs=1)
def noise(xs, p: MergeParams, gen: torch.Generator, **_) -> torch.Tensor:
    """Gaussian noise of relative MSE `noise` (std = sqrt(noise)·std of the tensor), seeded per
    tensor: not a merge but a probe of how much error a model tolerates (the tolerance curve
    every reconstruction is read against)."""
    x = xs[0]
    sd = float(x.std()) if x.numel() > 1 else 0.0
    return x + torch.randn(x.shape, generator=gen) * (math.sqrt(p.noise) * sd)
