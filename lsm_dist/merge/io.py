"""Small safetensors helpers for the merge stages: atomic writes, header metadata, devices."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import torch

from lsm_dist.checkpoint import (
    DTYPES,
    CheckpointError,
    TensorInfo,
    nonfinite_count,
    read_safetensors_header,
    write_safetensors,
)
from lsm_dist.utils import atomic_open, fsync_dir, named_os_error

TensorOrRows = torch.Tensor | Iterator[torch.Tensor]  # a tensor, or its row blocks in order


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Safetensors written through ``utils.atomic_open``: readers never see half a file (and
    the same tensors always give the same bytes)."""
    with atomic_open(path, "wb") as f:
        write_safetensors(f, tensors, metadata)


def read_header(path: str | Path) -> dict | None:
    """Header of a safetensors file (tensors + ``__metadata__``), None if missing or corrupt."""
    try:
        return read_safetensors_header(Path(path))[0]
    except (CheckpointError, OSError):
        return None


def read_meta(path: str | Path, key: str = "meta") -> dict | None:
    """JSON stored under ``__metadata__[key]`` of a safetensors file, None if absent/corrupt."""
    header = read_header(path)
    if header is None:
        return None
    raw = (header.get("__metadata__") or {}).get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


_LIBC = None


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Tensor-by-tensor work allocates and frees buffers of many sizes; glibc's dynamic mmap
    threshold then serves them from the heap and keeps freed pages, so resident memory would
    creep up with the number of tensors processed. Called after each tensor / layer file."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return dev


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU (float32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    from contextlib import nullcontext

    return nullcontext()


def write_streaming(path: str | Path, infos: list[TensorInfo], fetch: Callable[[str], TensorOrRows],
                    metadata: dict[str, str] | None = None, error: type[Exception] = ValueError,
                    atomic: bool = False) -> int:
    """Write a safetensors file one tensor at a time: the header comes from the expected names,
    dtypes and shapes, then ``fetch(name)`` is called once per tensor and its bytes appended, so
    memory holds one tensor -- or one row block, where ``fetch`` returns an iterator of the
    tensor's row blocks (first axis) in order. Each tensor must match its expected shape/dtype
    and be finite (else ``error`` naming it). ``atomic``: write a temp file and rename. Returns
    data bytes."""
    path = Path(path)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for t in infos:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    dst = path
    if atomic:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        dst = Path(tmp)
    try:
        with open(dst, "wb") as f:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            flushed = f.tell()
            for t in infos:
                _write_tensor(f, t, fetch(t.name), error)
                if f.tell() - flushed >= WRITEBACK_BYTES:
                    flushed = _start_writeback(f, flushed)
            f.flush()
            os.fsync(f.fileno())
        if atomic:
            os.replace(dst, path)
            fsync_dir(path.parent)
    except BaseException as e:
        if atomic:
            with suppress(FileNotFoundError):
                os.unlink(dst)
        if isinstance(e, OSError):
            raise named_os_error(e, path) from None
        raise
    return off


WRITEBACK_BYTES = 64 << 20


def _start_writeback(f, since: int) -> int:
    """Hand the bytes written since ``since`` to the kernel's writeback now (Linux: fadvise
    DONTNEED starts writing dirty pages back without waiting, then drops them from the page
    cache), so the final fsync waits for little and a large checkpoint does not fill the page
    cache. Returns the new mark."""
    f.flush()
    end = f.tell()
    with suppress(AttributeError, OSError):
        os.posix_fadvise(f.fileno(), since, end - since, os.POSIX_FADV_DONTNEED)
    return end


def _write_tensor(f, t: TensorInfo, x: TensorOrRows, error: type[Exception]) -> None:
    """Append one tensor's bytes (a tensor, or its row blocks in order), checked as they come."""
    want, dtype = tuple(t.shape), DTYPES[t.dtype]
    rows, whole = 0, isinstance(x, torch.Tensor)
    for blk in ([x] if whole else x):
        shape = tuple(blk.shape)
        if whole and shape != want or not whole and (shape[1:] != want[1:] or len(shape) != max(len(want), 1)) \
                or blk.dtype != dtype:
            raise error(f"tensor {t.name!r}: got {'' if whole else 'a row block '}{shape} {blk.dtype}, "
                        f"expected {want} {dtype}")
        if n_bad := nonfinite_count(blk):
            raise error(f"tensor {t.name!r} holds {n_bad} NaN/Inf value(s)"
                        + ("" if whole else f" (rows {rows}..{rows + shape[0]})"))
        f.write(memoryview(blk.contiguous().reshape(-1).view(torch.uint8).numpy()))  # no copy
        rows += shape[0] if shape else 1
        del blk
    if not whole and rows != (want[0] if want else 1):
        raise error(f"tensor {t.name!r}: its row blocks hold {rows} rows, expected {want[0] if want else 1}")
