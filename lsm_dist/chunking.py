"""Layer-aware chunking: tensor → standardized samples of ``tokens × chunk`` values, and back.

Forward: flatten row-major → standardize with the tensor's own mean and std (float64) →
zero-pad (in normalized space, i.e. pad with the mean) to a multiple of ``tokens·chunk`` →
reshape to ``(n_samples, tokens, chunk)`` float32. A sample never holds values of two tensors.

Inverse: ``denormalize`` maps float32 samples back: ``x·std + mean`` (float32 arithmetic for
16-bit sources, float64 for float32 ones) → float32 → the original dtype (round-to-nearest-even). An affine map with
a non-power-of-two scale is not exactly invertible in floating point (a zero weight comes back
as ~1e-13; an fp32 weight can move by one ulp), so the converter runs the inverse once and
records every element that does not come back bit-identical as a *fixup* (flat index + raw
bits of the original). With fixups applied the round trip is bit-exact in bf16, fp16 and fp32;
the manifest reports how many there are (bf16 checkpoints: a handful per tensor, mostly exact
zeros; fp32 checkpoints: a sizeable fraction, since fp32 keeps more bits than the float32
normalized value can carry through the affine map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

STAT_BLOCK = 1 << 22  # elements per float64 working block (32 MiB)

BITS_DTYPE = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


@dataclass(frozen=True)
class ChunkSpec:
    tokens: int
    chunk: int

    def __post_init__(self) -> None:
        if self.tokens <= 0 or self.chunk <= 0:
            raise ValueError(f"tokens and chunk must be positive, got tokens={self.tokens} chunk={self.chunk}")

    @property
    def sample_size(self) -> int:
        return self.tokens * self.chunk

    def num_samples(self, numel: int) -> int:
        return math.ceil(numel / self.sample_size)

    def padding(self, numel: int) -> int:
        return self.num_samples(numel) * self.sample_size - numel


def _f32_slice(t: torch.Tensor, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Flat float32 numpy values of elements [start, stop) (16-bit dtypes widen exactly).

    Only the slice is converted, so working memory stays one block, not a tensor copy. For
    float32/64 tensors this is a view of the source: never modify it in place.
    """
    flat = t.reshape(-1)[start:stop]
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)
    return flat.numpy()


class NonFiniteError(ValueError):
    """A tensor holds NaN or Inf values."""

    def __init__(self, t: torch.Tensor, what: str = "tensor"):
        self.n_nan, self.n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        super().__init__(f"{what}: contains {self.n_nan} NaN and {self.n_inf} Inf value(s)")


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(t, what)


def norm_stats(t: torch.Tensor) -> tuple[float, float]:
    """(mean, std) in float64, deterministic across processes and thread counts
    (numpy pairwise sums over fixed blocks; no BLAS). Raises on NaN/Inf (they make the
    sums non-finite, so no separate scan is needed). A constant tensor gets std 1.0.
    """
    n = t.numel()
    if n == 0:
        return 0.0, 1.0
    s = 0.0
    for a in range(0, n, STAT_BLOCK):
        s += float(np.sum(_f32_slice(t, a, a + STAT_BLOCK), dtype=np.float64))
    mean = s / n
    ss = 0.0
    for a in range(0, n, STAT_BLOCK):
        x = _f32_slice(t, a, a + STAT_BLOCK)
        d = x - x.dtype.type(mean)
        ss += float(np.sum(d * d, dtype=np.float64))
    if not (math.isfinite(mean) and math.isfinite(ss)):
        raise NonFiniteError(t)
    std = math.sqrt(ss / n)
    if std == 0.0:
        std = 1.0
    return mean, std


def _work_dtype(dtype: torch.dtype) -> type:
    """Arithmetic precision of the affine map: float32 suffices for 16-bit sources."""
    return np.float64 if dtype in (torch.float32, torch.float64) else np.float32


def normalize_range(t: torch.Tensor, mean: float, std: float, start: int, stop: int) -> np.ndarray:
    """Normalized float32 values of flat elements [start, stop) (beyond numel → 0 padding)."""
    wd = _work_dtype(t.dtype)
    out = np.zeros(stop - start, dtype=np.float32)
    hi = min(stop, t.numel())
    if hi > start:
        v = _f32_slice(t, start, hi).astype(wd)  # a copy: the source stays untouched
        v -= wd(mean)
        v /= wd(std)
        out[: hi - start] = v
    return out


def denormalize(values: np.ndarray | torch.Tensor, mean: float, std: float, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of the standardization, rounded into ``dtype`` (no fixups applied).

    ``x·std + mean`` in float32 for 16-bit targets (float64 for float32/64 targets), rounded
    to float32 by numpy and then to ``dtype`` by torch, both round-to-nearest-even.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    wd = _work_dtype(dtype)
    x = values.astype(wd)
    x *= wd(std)
    x += wd(mean)
    out = torch.from_numpy(x.astype(np.float32, copy=False))
    return out if dtype == torch.float32 else out.to(dtype)


def to_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS_DTYPE[t.dtype])


def find_fixups(original_flat: torch.Tensor, values: np.ndarray, mean: float, std: float, offset: int) -> np.ndarray:
    """Elements whose inverse differs from the original: int64 array (2, k) of [flat index, bits]."""
    n = original_flat.numel()
    back = denormalize(values[:n], mean, std, original_flat.dtype)
    ob, bb = to_bits(original_flat), to_bits(back)
    bad = torch.nonzero(ob != bb, as_tuple=False).reshape(-1)
    if bad.numel() == 0:
        return np.zeros((2, 0), dtype=np.int64)
    idx = bad.to(torch.int64).numpy() + offset
    bits = ob[bad].to(torch.int64).numpy()
    return np.stack([idx, bits])


def chunk_range(
    t: torch.Tensor, spec: ChunkSpec, mean: float, std: float, first: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Samples [first, first+count) of tensor ``t``: float32 (count, tokens, chunk) + fixups."""
    s = spec.sample_size
    start, stop = first * s, (first + count) * s
    values = normalize_range(t, mean, std, start, stop)
    flat = t.reshape(-1)
    orig = flat[start : min(stop, flat.numel())]
    fix = find_fixups(orig, values, mean, std, offset=start)
    return values.reshape(count, spec.tokens, spec.chunk), fix


def chunk_tensor(t: torch.Tensor, spec: ChunkSpec) -> tuple[np.ndarray, np.ndarray, float, float]:
    """All samples of ``t``: (samples, fixups, mean, std)."""
    mean, std = norm_stats(t)
    samples, fix = chunk_range(t, spec, mean, std, 0, spec.num_samples(t.numel()))
    return samples, fix, mean, std


def unchunk(
    samples: np.ndarray | torch.Tensor,
    shape: tuple[int, ...] | list[int],
    dtype: torch.dtype,
    mean: float,
    std: float,
    fixups: np.ndarray | None = None,
) -> torch.Tensor:
    """Samples → tensor of ``shape`` and ``dtype``: drop padding, de-normalize, apply fixups."""
    numel = int(np.prod(shape)) if len(shape) else 1
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().to("cpu", torch.float32).numpy()
    flat = np.asarray(samples, dtype=np.float32).reshape(-1)
    if flat.size < numel:
        raise ValueError(f"unchunk: {flat.size} values cannot fill a tensor of shape {tuple(shape)}")
    out = denormalize(flat[:numel], mean, std, dtype).clone()
    if fixups is not None and fixups.shape[1]:
        bits = to_bits(out)
        idx = torch.from_numpy(np.ascontiguousarray(fixups[0]))
        bits[idx] = torch.from_numpy(np.ascontiguousarray(fixups[1])).to(bits.dtype)
    return out.reshape(tuple(shape))
