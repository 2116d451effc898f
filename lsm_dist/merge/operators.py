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

The other families live in ``lsm_dist.merge.task_vectors`` (task arithmetic, TIES, DARE,
Breadcrumbs, DELLA) and ``lsm_dist.merge.spherical`` (slerp, nuslerp, multislerp, karcher,
model_stock); they register here when ``lsm_dist.merge`` is imported (its ``__init__``).

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
GRANULARITIES = ("tensor", "vector", "column")
RESCALES = ("inverse", "l1", "none")
SIGN_TIES = ("zero", "positive")
TIE_BREAKS = ("spread", "argsort")


@dataclass
class MergeParams:
    """Parameters of the merge operators (YAML key ``lambda`` is field ``lambda_``).

    Per-input values (``weights``, ``density``, ``gamma``, ``epsilon``) are one number for
    every input or a list in the order of ``inputs``; a plan's ``models.<id>.params`` and
    ``tensor_params`` resolve into these per tensor (``lsm_dist.merge.settings``)."""

    lambda_: float = doc(
        "λ (YAML / override key `lambda`) ∈ [0, 1]: lerp/slerp z = (1-λ)·z_0 + λ·z_1 (λ=0 gives the first input, by default "
        "the target; mergekit's slerp `t`); heterogeneous merges: z = z_t + λ(T(z_s) - z_t)", 0.5)
    weights: list[float] | None = doc(
        "per-input weights, in the order of `inputs`: soup (must sum to 1 unless normalize), linear, "
        "task-vector methods (scale of each delta; default 1.0 each), nuslerp / multislerp / karcher", None)
    normalize: bool | None = doc(
        "divide by the sum of the weights (task-vector methods with sign consensus: by the weights "
        "of the agreeing inputs, per entry); null = the method's default (mergekit's): true for "
        "linear, ties, della, multislerp; false for the others (soup then needs weights summing to 1)", None)
    density: float | list[float] = doc(
        "fraction of each delta kept, in (0, 1], per input or one for all: ties / breadcrumbs (by "
        "magnitude), dare_ties / dare_linear / della (expected fraction kept at random)", 0.5)
    drop_p: float = doc("dare: drop probability p ∈ [0, 1) (density = 1 - p)", 0.5)
    gamma: float | list[float] = doc("breadcrumbs: fraction of the largest-magnitude delta entries removed", 0.01)
    epsilon: float | list[float] = doc("della: keep probabilities range over density ± epsilon by magnitude rank", 0.15)
    rescale: str | None = doc(
        "after random dropping: inverse (kept entries × 1/keep-probability, as the DARE/DELLA "
        "papers) | l1 (match the delta's L1 norm, mergekit's `rescale: true`) | none; null = inverse "
        "for the random methods (dare*, della*), none for the others", None)
    tie_break: str = doc(
        "ties / magnitude trimming, which of the entries tied at the density threshold are kept (bf16 "
        "weights make large tie groups): spread (a fixed hash order of their positions: the same on any "
        "device, merged by row blocks, memory of a block) | argsort (torch's argsort order on the CPU, "
        "as mergekit: bit-equal to it; merged by row blocks after replaying the sort's partitions on |delta| "
        "of the whole tensor, 6 bytes per entry for bf16 weights). Default: spread; argsort for "
        "mergekit configs", "spread")
    sign_tie: str = doc(
        "sign-consensus methods, entries whose weighted delta sum is exactly 0: zero (no sign is "
        "elected, the entry keeps the base) | positive (+ wins, as mergekit)", "zero")
    scale: float = doc("task-vector methods: factor on the merged delta (mergekit `lambda`); "
                       "passthrough: factor on the tensor (mergekit `scale`)", 1.0)
    samples: int = doc("self_merge: number K of posterior samples z = mu + sigma·eps averaged", 8)
    seed: int = doc("seed for random masks, self_merge samples and OT subsampling", 0)
    granularity: str = doc(
        "slerp / nuslerp / model_stock: 'tensor' (one flattened vector), 'vector' (per vector along "
        "the last axis: per latent token / weight row) or 'column' (nuslerp: along the first axis)", "tensor")
    eps: float = doc("slerp_norm: LERP where the angle is within eps radians of 0 or π", 1e-4)
    max_iter: int = doc("karcher: iterations of the Karcher-mean fixed point", 10)
    tol: float = doc("karcher: stop when the tangent step norm is below this", 1e-5)
    noise: float = doc("noise: relative MSE of the Gaussian noise added (noise std = sqrt(noise) · the "
                       "tensor's std)", 0.01)
    select_topk: float = doc("sce: fraction of the entries (those of highest variance across the inputs) "
                             "kept (mergekit `select_topk`)", 1.0)
    ram_epsilon: float = doc("ram / ramplus_tl: a delta entry counts as a change above this (mergekit "
                             "`epsilon`)", 1e-5)
    ram_r: float = doc("ramplus_tl: rescaling strength r (mergekit `r`)", 0.1)
    ram_alpha: float = doc("ramplus_tl: cap of the shared / unique ratio (mergekit `alpha`)", 0.2)
    nearswap_t: float = doc("nearswap: similarity threshold t (mergekit `t`): the input's value where "
                            "|base − input| ≤ t", 1e-4)

    def __post_init__(self) -> None:
        lam = self.lambda_
        check(isinstance(lam, (int, float)) and math.isfinite(lam) and 0.0 <= lam <= 1.0,
              "params.lambda", f"must be in [0, 1], got {lam!r}")
        for name, lo, lo_open, hi, hi_open in (("density", 0.0, True, 1.0, False),
                                               ("gamma", 0.0, False, 1.0, True),
                                               ("epsilon", 0.0, False, 1.0, True)):
            vals = getattr(self, name)
            vals = vals if isinstance(vals, list) else [vals]
            check(bool(vals), f"params.{name}", "must not be an empty list")
            for v in vals:
                ok = isinstance(v, (int, float)) and math.isfinite(v) and (v > lo if lo_open else v >= lo) \
                    and (v < hi if hi_open else v <= hi)
                check(ok, f"params.{name}", f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}"
                      f"{')' if hi_open else ']'}, got {getattr(self, name)!r}")
        check(0.0 <= self.drop_p < 1.0, "params.drop_p", f"must be in [0, 1), got {self.drop_p!r}")
        check(isinstance(self.samples, int) and self.samples >= 1, "params.samples",
              f"must be a positive integer, got {self.samples!r}")
        check_choice(self.granularity, "params.granularity", GRANULARITIES)
        check(self.rescale is None or self.rescale in RESCALES, "params.rescale",
              f"{self.rescale!r} is not one of {list(RESCALES)}")
        check_choice(self.sign_tie, "params.sign_tie", SIGN_TIES)
        check_choice(self.tie_break, "params.tie_break", TIE_BREAKS)
        check(math.isfinite(self.scale), "params.scale", f"must be finite, got {self.scale!r}")
        check(isinstance(self.max_iter, int) and self.max_iter >= 1, "params.max_iter", "must be >= 1")
        check(self.tol > 0, "params.tol", f"must be > 0, got {self.tol!r}")
        check(self.eps >= 0, "params.eps", f"must be >= 0, got {self.eps!r}")
        check(isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and self.noise >= 0,
              "params.noise", f"must be a finite number >= 0, got {self.noise!r}")
        check(0.0 <= self.select_topk <= 1.0, "params.select_topk", f"must be in [0, 1], got {self.select_topk!r}")
        for name in ("ram_epsilon", "ram_r", "ram_alpha", "nearswap_t"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f"params.{name}",
                  f"must be a finite number >= 0, got {v!r}")
        if self.weights is not None:
            check(len(self.weights) > 0, "params.weights", "must not be empty")
            check(all(math.isfinite(w) for w in self.weights), "params.weights",
                  f"must be finite numbers, got {self.weights}")


OpFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Operator:
    name: str
    fn: OpFn
    base: str = "none"  # none | optional | required
    needs_logvar: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    latent_only: bool = False
    native_dtype: bool = False  # computes in the inputs' dtype when asked (mergekit's arithmetic)
    # with mergekit's arithmetic its result is float32 whatever the dtype (a float32 mask or scale
    # promotes it) and mergekit writes it so: the output tensors are float32 unless out_dtype is set
    promotes: bool = False
    weights: str = "none"  # none | sum_to_one | scale | normalize
    per_input: tuple[str, ...] = ()  # per-input parameters besides weights (density, gamma, ...)
    # by row blocks: stream(n, read, read_base, shape, params, key) -> iterator of merged row blocks
    # (read(i, a, b) / read_base(a, b): rows [a, b) in the working dtype), None where the params
    # need the whole tensor; see apply_operator_stream
    stream: Callable | None = None
    doc: str = ""

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def takes_base(self, has_base: bool) -> bool:
        """Whether the operator is given a base tensor (required, or optional and set)."""
        return self.base == "required" or (self.base == "optional" and has_base)

    def validate(self, params: MergeParams, n_inputs: int, has_base: bool) -> None:
        """Check arity, base and per-input parameters for ``n_inputs`` inputs (messages name the field)."""
        lo, hi = self.min_inputs, self.max_inputs
        want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo}..{hi}")
        check(n_inputs >= lo and (hi is None or n_inputs <= hi), "inputs",
              f"method {self.name!r} takes {want} input model(s), got {n_inputs}")
        if self.needs_base:
            check(has_base, "base", f"method {self.name!r} merges deltas from a base model: set `base`")
        resolve_weights(self, params, n_inputs)
        for name in self.per_input:
            per_input(params, name, n_inputs)


OPERATORS: dict[str, Operator] = {}


def register_operator(name: str, **props) -> Callable[[OpFn], OpFn]:
    """Decorator: register ``fn(xs, params, base, logvars, gen) -> Tensor`` under ``name``."""

    def deco(fn: OpFn) -> OpFn:
        if name in OPERATORS:
            raise ValueError(f"merge operator {name!r} is already registered")
        if props.pop("needs_base", False):
            props["base"] = "required"
        OPERATORS[name] = Operator(name, fn, doc=(fn.__doc__ or "").strip().split("\n")[0], **props)
        return fn

    return deco


def get_operator(name: str) -> Operator:
    op = OPERATORS.get(name)
    if op is None:
        raise ConfigError(f"method: unknown merge operator {name!r}; known operators: {sorted(OPERATORS)}")
    return op


def resolve_weights(op: Operator, params: MergeParams, n: int) -> list[float]:
    """The per-input weights an operator uses (validated; normalized if asked, except for
    ``normalize`` operators, which divide after summing)."""
    if op.weights == "none":
        return []
    w = params.weights
    if w is None:
        return [1.0 / n] * n if op.weights == "sum_to_one" else [1.0] * n
    check(len(w) == n, "params.weights", f"has {len(w)} value(s) but method {op.name!r} has {n} input(s)")
    total = float(sum(w))
    if op.weights == "sum_to_one" and params.normalize:
        check(abs(total) > 1e-12, "params.weights", f"sum to {total}; cannot normalize by a zero sum")
        return [float(x) / total for x in w]
    if op.weights == "sum_to_one":
        check(abs(total - 1.0) <= 1e-6, "params.weights",
              f"{list(w)} sum to {total:g}, must sum to 1 (or set params.normalize: true)")
    return [float(x) for x in w]


def per_input(params: MergeParams, name: str, n: int) -> list[float]:
    """A per-input parameter (``density``, ``gamma``, ``epsilon``) as ``n`` numbers."""
    v = getattr(params, name)
    if not isinstance(v, list):
        return [float(v)] * n
    check(len(v) == n, f"params.{name}", f"has {len(v)} value(s) for {n} input(s)")
    return [float(x) for x in v]


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
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Validate and run operator ``name``; inputs are cast to float32 and so is the output,
    except with ``dtype`` for operators with ``native_dtype`` (the task-vector methods,
    nuslerp, multislerp, karcher, model_stock, passthrough), which then compute in ``dtype`` as
    mergekit does in its ``dtype``; the others (linear, slerp, ...) compute in float32 there too."""
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
    work = dtype if (dtype is not None and op.native_dtype) else torch.float32
    xs = [x.to(work) for x in xs]
    base = base.to(work) if base is not None and op.base != "none" else None
    lv = [v.float() for v in logvars] if logvars is not None else None
    return op.fn(xs, params, base=base, logvars=lv, gen=make_generator(params.seed, key), key=key)


def apply_operator_stream(name: str, n: int, read: Callable, read_base: Callable | None,
                          shape: tuple[int, ...], params: MergeParams | None = None, key: str = "",
                          dtype: torch.dtype | None = None):
    """The merged tensor as an iterator of row blocks (the rows of ``row_spans(shape)``, in
    order), for operators that merge row by row (linear, soup, task arithmetic, TIES, DARE):
    ``read(i, a, b)`` / ``read_base(a, b)`` return rows ``[a, b)`` of input i / the base, which
    are cast to the working dtype (as :func:`apply_operator`). Memory: a few row blocks, never
    the whole tensor. None when the operator (or its params) needs whole tensors: then call
    :func:`apply_operator`. Same values as it, bit for bit."""
    params = params or MergeParams()
    op = get_operator(name)
    if op.stream is None:
        return None
    op.validate(params, n, read_base is not None)
    work = dtype if (dtype is not None and op.native_dtype) else torch.float32
    takes_base = read_base is not None and op.base != "none"

    def rd(i: int, a: int, b: int) -> torch.Tensor:
        return read(i, a, b).to(work)

    def rb(a: int, b: int) -> torch.Tensor:
        return read_base(a, b).to(work)

    return op.stream(n, rd, rb if takes_base else None, tuple(shape), params, key)


# ---------------------------------------------------------------------------- operators
@register_operator("lerp", min_inputs=2, max_inputs=2)
def lerp(xs, p: MergeParams, **_) -> torch.Tensor:
    """Linear interpolation z = (1-λ)·z_0 + λ·z_1."""
    return torch.lerp(xs[0], xs[1], p.lambda_)


def weighted_sum(xs: Sequence[torch.Tensor], w: Sequence[float], normalize: bool = False) -> torch.Tensor:
    """Σ w_i x_i accumulated in input order (float32 coefficients), then ÷ Σ w_i if
    ``normalize`` (a zero sum is refused): the arithmetic order of mergekit's linear merge."""
    coef = torch.tensor(list(w), dtype=xs[0].dtype)
    out = torch.zeros_like(xs[0])
    for c, x in zip(coef, xs):
        out.addcmul_(x, c)
    if normalize:
        total = coef.sum()
        check(float(total.abs()) > 1e-12, "params.weights", f"sum to {float(total)}; cannot normalize by a zero sum")
        out.div_(total)
    return out


# A tensor merged by row blocks is cut into blocks of whole rows (its first axis) of about
# BLOCK_ELEMS entries: the blocks depend on the tensor's shape only, so a result does not depend
# on memory settings or on whether the inputs were in memory (latents) or read from disk (weights).
BLOCK_ELEMS = 1 << 22


def row_spans(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The row blocks ``[a, b)`` of a tensor of ``shape`` (a 0-d tensor: one row)."""
    rows = shape[0] if shape else 1
    per_row = max(1, math.prod(shape[1:])) if shape else 1
    step = max(1, BLOCK_ELEMS // per_row)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def stream_weighted(name: str, normalize: Callable[[MergeParams], bool]) -> Callable:
    """The ``stream`` of an operator that is a :func:`weighted_sum` (row by row, the same sums)."""

    def stream(n: int, read, read_base, shape, p: MergeParams, key: str):
        w = resolve_weights(OPERATORS[name], p, n)
        return (weighted_sum([read(i, a, b) for i in range(n)], w, normalize(p)) for a, b in row_spans(shape))

    return stream


@register_operator("soup", min_inputs=1, weights="sum_to_one",
                   stream=stream_weighted("soup", lambda p: False))
def soup(xs, p: MergeParams, **_) -> torch.Tensor:
    """Weighted mean Σ w_i z_i (uniform weights by default; they must sum to 1 unless normalize)."""
    return weighted_sum(xs, resolve_weights(OPERATORS["soup"], p, len(xs)))


@register_operator("linear", min_inputs=1, weights="normalize",
                   stream=stream_weighted("linear", lambda p: p.normalize is not False))
def linear(xs, p: MergeParams, **_) -> torch.Tensor:
    """mergekit's linear: Σ w_i z_i, divided by Σ w_i unless normalize is false (weights default 1)."""
    w = resolve_weights(OPERATORS["linear"], p, len(xs))
    return weighted_sum(xs, w, normalize=p.normalize is not False)


@register_operator("passthrough", min_inputs=1, max_inputs=1, native_dtype=True)
def passthrough(xs, p: MergeParams, **_) -> torch.Tensor:
    """The single input unchanged (times ``scale`` when it is not 1): layer stacking with slices."""
    return xs[0].clone() if p.scale == 1.0 else xs[0] * p.scale


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
