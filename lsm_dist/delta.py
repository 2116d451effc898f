"""Task vectors ``τ = W − W_base``: the data of delta corpora and of delta encoding.

The paper's LoRA-expert setting encodes the experts' *updates*, not the pretrained weights. A
**delta corpus** (``lsm convert base=BASE models=[...]``) stores, for every selected tensor of
every model, ``τ = float32(W) − float32(W_base)`` (float32 values, format 2), each standardized
on read by its own mean / std like any entry; each entry also records ``base_std``, the base
tensor's std. At finalize the manifest gets ``delta = {base, base_digest, gain}``, with
``gain`` the median over entries of ``std(τ) / std(W_base)``. A VAE trained on that corpus
carries the record in its config (``VAEConfig.delta``).

**Delta encoding** (a merge plan's ``encoding: delta``) encodes each operand's task vector
with one scale per tensor shared by every model, ``s_t = gain · std(W_base,t)`` (mean 0): the
same scale for all operands keeps latent operators consistent with weight-space ones (with a
linear code, a latent soup of task vectors is the code's projection of their weighted sum),
and it depends only on the base and the VAE, so latents stay cached per model. The base itself
encodes as ``τ = 0``. Decoding lands on the base: ``W = W_base + s_t · D(z_merged)``
(``decode: direct``) or ``W = W_target + s_t · (D(z_merged) − D(z_target))`` (``decode: delta``).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

import torch

from lsm_dist.checkpoint import Checkpoint


class DeltaError(ValueError):
    """A model does not pair with its base (the message names the tensor and both files)."""


def check_pairs(model: Checkpoint, base: Checkpoint, names: Iterable[str], what: str = "") -> None:
    """Every tensor ``names`` of ``model`` exists in ``base`` with the same shape (before any
    data is read)."""
    for n in names:
        t, b = model.tensors.get(n), base.tensors.get(n)
        if t is None:
            raise DeltaError(f"{what}{model.path}: has no tensor {n!r}")
        if b is None:
            raise DeltaError(f"{what}base {base.path} has no tensor {n!r} of {model.path}: not its base")
        if tuple(t.shape) != tuple(b.shape):
            raise DeltaError(f"{what}tensor {n!r} is {list(t.shape)} in {model.path} but {list(b.shape)} in "
                             f"base {base.path}: not its base")


def task_vector(model: Checkpoint, base: Checkpoint, name: str) -> torch.Tensor:
    """``float32(W) − float32(W_base)`` of tensor ``name`` (exact for bf16 / fp16 weights)."""
    return model.read(name).float() - base.read(name).float()


def delta_gain(entries: Iterable[dict]) -> float:
    """Median over delta-corpus entries of ``std(τ) / std(W_base)`` (1.0 when undefined)."""
    ratios = [e["std"] / e["base_std"] for e in entries if e.get("base_std") and e.get("std")]
    return float(statistics.median(ratios)) if ratios else 1.0
