"""Layer-aware chunking: tensor → samples of ``tokens × chunk`` values, normalization, and back.

A tensor is flattened row-major, zero-padded to a multiple of ``tokens·chunk`` and cut into
samples ``(n_samples, tokens, chunk)``; a sample never holds values of two tensors. The model
sees every value standardized with its tensor's own mean and std, and the padding as exactly 0.

Corpus format 2 (the default) stores the samples as the tensor's *raw values* in its own dtype
(``raw_block``): exact by construction. The reader standardizes on read with ``standardize``:
one step from the stored dtype to float32 ``(x − mean) / std``, in float32 arithmetic for 16-bit
sources and float64 for fp32 ones, the arithmetic ``normalize_range`` applies to a source tensor
(so the encoder of ``lsm merge`` and the trainer see the same numbers, and format-1 samples of
the same weights come out bit-identical).

Corpus format 1 (still read, and written with ``format_version=1`` for comparisons) stores the
standardized float32 samples (``chunk_range``). The affine map is not exactly invertible in
floating point, so conversion records every element whose inverse (``denormalize``) does not
come back bit-identical as a *fixup* (flat index + raw bits); ``unchunk`` applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

STAT_BLOCK = 1 << 22  # elements per float64 working block of callers that de-normalize in blocks
_STAT_CHUNK = 1 << 16  # elements per cache-resident working chunk of norm_stats

BITS_DTYPE = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


@dataclass(frozen=True)
class StoredDtype:
    """A dtype samples can be stored in: its safetensors name, torch dtype, the numpy dtype that
    holds its bytes (bf16, which numpy lacks, as uint16 bits) and the standardization precision."""

    name: str
    torch: torch.dtype
    numpy: np.dtype
    work: type

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize


STORED: dict[str, StoredDtype] = {
    "BF16": StoredDtype("BF16", torch.bfloat16, np.dtype("<u2"), np.float32),
    "F16": StoredDtype("F16", torch.float16, np.dtype("<f2"), np.float32),
    "F32": StoredDtype("F32", torch.float32, np.dtype("<f4"), np.float64),
}
# arithmetic of the standardization for every float source (F64 only as a source of
# normalize_range: the corpus does not store it)
_ARITH = {**STORED, "F64": StoredDtype("F64", torch.float64, np.dtype("<f8"), np.float64)}
_TORCH_NAME = {d.torch: d.name for d in _ARITH.values()}


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


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors name of a float torch dtype (``ValueError`` for others)."""
    try:
        return _TORCH_NAME[dtype]
    except KeyError:
        raise ValueError(f"{dtype} is not a floating-point dtype the corpus handles "
                         f"({', '.join(_ARITH)})") from None


def raw_numpy(t: torch.Tensor) -> np.ndarray:
    """The flat values of ``t`` as numpy, without a copy (bf16 as its uint16 bits)."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def as_tensor(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`raw_numpy`: numpy values stored as ``dtype`` → a torch tensor (no copy)."""
    t = torch.from_numpy(np.ascontiguousarray(raw))
    return t.view(torch.int16).view(torch.bfloat16) if dtype == "BF16" else t


class NonFiniteError(ValueError):
    """A tensor holds NaN or Inf values (picklable: it crosses worker processes)."""

    def __init__(self, t: torch.Tensor | None, what: str = "tensor", counts: tuple[int, int] | None = None):
        self.what = what
        self.n_nan, self.n_inf = counts if counts is not None else (int(torch.isnan(t).sum()), int(torch.isinf(t).sum()))
        super().__init__(f"{what}: contains {self.n_nan} NaN and {self.n_inf} Inf value(s)")

    def __reduce__(self):
        return type(self), (None, self.what, (self.n_nan, self.n_inf))


# (bits dtype, mask of everything but the sign, smallest non-finite magnitude) per float dtype
_NONFINITE = {"BF16": (np.uint16, 0x7FFF, 0x7F80), "F16": (np.uint16, 0x7FFF, 0x7C00),
              "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000), "F64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` (naming ``what``) if ``t`` holds a NaN or Inf.

    A bit test (|bits| ≥ the exponent-all-ones pattern) and a max per cache-sized chunk, on the
    stored bits: ~6 GiB/s of bf16 on one core, no float conversion, no copy of the tensor."""
    if t.numel() == 0:
        return
    bits, mask, inf = _NONFINITE[dtype_name(t.dtype)]
    u = raw_numpy(t).view(bits)
    tmp = np.empty(min(len(u), _STAT_CHUNK), bits)
    for a in range(0, len(u), _STAT_CHUNK):
        part = tmp[: len(u[a : a + _STAT_CHUNK])]
        np.bitwise_and(u[a : a + _STAT_CHUNK], bits(mask), out=part)
        if part.max() >= inf:
            raise NonFiniteError(t, what)


def _copy_rows(dst: np.ndarray, src: np.ndarray, rows) -> None:
    """``dst = src`` (with a widening cast), or ``dst[j] = src[rows[j]]``: rows gathered by plain
    row copies, with no fancy-indexing temporary."""
    if rows is None:
        np.copyto(dst, src)
    else:
        for j, r in enumerate(rows):
            np.copyto(dst[j], src[r])


def _to_f32(raw: np.ndarray, dtype: str, out: np.ndarray, rows=None) -> np.ndarray:
    """Stored 16-bit values → float32 (exact widening) in ``out`` (``rows``: of these rows of
    ``raw`` only).

    Bit operations only (numpy's own fp16 cast is ~4x slower, and torch ops would start their
    own thread pool inside the loader threads); a widening copy and then shifts in place beat
    one casting shift. bf16 is the top half of a float32. fp16: its bits sign-extended to 32
    and shifted left by 13 put exponent + mantissa at float32's bits 13–27 and the sign at bit
    31; masking the rest gives a float32 of the same sign whose magnitude is the fp16 value ×
    2^-112, exact for every finite fp16 (subnormals too); × 2^112 is exact.
    """
    if dtype == "BF16":
        w = out.view(np.uint32)
        _copy_rows(w, raw, rows)
        np.left_shift(w, 16, out=w)
        return out
    w = out.view(np.int32)
    _copy_rows(w, raw.view(np.int16), rows)
    np.left_shift(w, 13, out=w)
    np.bitwise_and(w, np.int32(-0x70002000), out=w)  # 0x8FFFE000: sign, exponent, mantissa
    np.multiply(out, np.float32(2.0**112), out=out)
    return out


def _shifted_sums(raw: np.ndarray, dtype: str, wd: type) -> tuple[float, float, float] | None:
    """(shift, Σ(x − shift), Σ(x − shift)²) of flat stored values, computed in ``wd`` per
    cache-sized chunk (numpy pairwise sums) and accumulated in float64; None if not finite."""
    n = len(raw)
    m = min(n, _STAT_CHUNK)
    wide = np.empty(m, np.float32) if dtype in ("BF16", "F16") else None
    d = np.empty(m, wd)
    shift, s1, s2 = None, 0.0, 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite sums are the answer
        for a in range(0, n, _STAT_CHUNK):
            part = raw[a : a + _STAT_CHUNK]
            k = len(part)
            x = _to_f32(part, dtype, wide[:k]) if wide is not None else part
            if shift is None:
                shift = wd(np.sum(x, dtype=np.float64) / k)
            dk = d[:k]
            np.subtract(x, shift, out=dk)
            s1 += float(np.sum(dk))
            np.multiply(dk, dk, out=dk)
            s2 += float(np.sum(dk))
    if not (math.isfinite(s1) and math.isfinite(s2)):
        return None
    return float(shift), s1, s2


def norm_stats(t: torch.Tensor) -> tuple[float, float]:
    """(mean, std) in float64 of a float tensor, in one pass over it.

    Sums of ``d = x − shift`` (``shift``: the first chunk's mean, so no cancellation) and of d²
    per cache-sized chunk in float32 (float64 for F64 tensors), numpy pairwise sums accumulated
    in float64: relative error ~1e-7, plenty for a normalization constant. Deterministic across
    processes, machines and thread counts — the same additions in the same order (no BLAS, no
    threads, no reductions whose order depends on the SIMD width) — so ``lsm verify`` recomputes
    exactly what conversion recorded. Squares that overflow float32 (|x − mean| > 1.8e19) are
    redone in float64. Raises :class:`NonFiniteError` on NaN/Inf (they make the sums non-finite,
    so no separate scan is needed). A constant tensor gets std 1.0.
    """
    n = t.numel()
    if n == 0:
        return 0.0, 1.0
    dtype = dtype_name(t.dtype)
    raw = raw_numpy(t)
    got = _shifted_sums(raw, dtype, np.float64 if dtype == "F64" else np.float32)
    if got is None and bool(torch.isfinite(t).all()):
        got = _shifted_sums(raw, dtype, np.float64)
    if got is None:
        raise NonFiniteError(t)
    shift, s1, s2 = got
    mu = s1 / n
    std = math.sqrt(max(s2 / n - mu * mu, 0.0))
    return shift + mu, (std if std > 0.0 else 1.0)


def standardize(raw: np.ndarray, dtype: str, mean, std, out: np.ndarray,
                work: np.ndarray | None = None, rows=None) -> np.ndarray:
    """``out = (raw − mean) / std`` as float32, from values stored as ``dtype``, in one step.

    ``raw`` holds the stored values (numpy dtype of ``STORED[dtype]``; bf16 as uint16 bits);
    ``out`` is a float32 array of its shape (it may not alias ``raw``), or with ``rows`` (2-D
    ``raw``) of shape ``(len(rows), raw.shape[1])``: ``out[j]`` from row ``rows[j]``, gathered
    by the widening copy itself. ``mean``/``std`` are scalars or arrays that broadcast against
    ``out`` (one per row: shape ``(n, 1)``). Arithmetic in float32 for 16-bit dtypes, float64 for
    F32/F64 (``work``: optional float64 scratch of ``out``'s shape); the float32 result is the
    same as ``normalize_range``'s. Padding is the caller's: it comes out as ``−mean/std``.
    """
    wd = _ARITH[dtype].work
    mean, std = np.asarray(mean, dtype=wd), np.asarray(std, dtype=wd)
    if wd is np.float32:
        _to_f32(raw, dtype, out, rows)
        np.subtract(out, mean, out=out)
        np.divide(out, std, out=out)
        return out
    if work is None or work.shape != out.shape:
        work = np.empty(out.shape, np.float64)
    _copy_rows(work, raw, rows)
    np.subtract(work, mean, out=work)
    np.divide(work, std, out=out, casting="same_kind")
    return out


def normalize_range(t: torch.Tensor, mean: float, std: float, start: int, stop: int) -> np.ndarray:
    """Standardized float32 values of flat elements [start, stop) of ``t`` (beyond numel → 0)."""
    out = np.zeros(stop - start, dtype=np.float32)
    hi = min(stop, t.numel())
    if hi > start:
        standardize(raw_numpy(t)[start:hi], dtype_name(t.dtype), mean, std, out[: hi - start])
    return out


def raw_block(t: torch.Tensor, spec: ChunkSpec, first: int, count: int) -> tuple[np.ndarray, int]:
    """Samples [first, first+count) of ``t`` in format 2: (its raw flat values, as a view of
    ``t`` — never modify it —, number of zero values of padding that complete the block)."""
    s = spec.sample_size
    start, stop = first * s, (first + count) * s
    raw = raw_numpy(t)[start:stop]
    return raw, (stop - start) - len(raw)


# ---- format 1: standardized float32 samples + fixups --------------------------------------

def _work_dtype(dtype: torch.dtype) -> type:
    return _ARITH[dtype_name(dtype)].work


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
    """Format 1: samples [first, first+count) of ``t``, float32 (count, tokens, chunk) + fixups."""
    s = spec.sample_size
    start, stop = first * s, (first + count) * s
    values = normalize_range(t, mean, std, start, stop)
    flat = t.reshape(-1)
    orig = flat[start : min(stop, flat.numel())]
    fix = find_fixups(orig, values, mean, std, offset=start)
    return values.reshape(count, spec.tokens, spec.chunk), fix


def chunk_tensor(t: torch.Tensor, spec: ChunkSpec) -> tuple[np.ndarray, np.ndarray, float, float]:
    """All standardized samples of ``t``: (samples, fixups, mean, std)."""
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
    """Standardized samples → tensor of ``shape`` and ``dtype``: drop padding, de-normalize,
    apply fixups."""
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
