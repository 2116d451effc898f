"""The merge + decode stage: per target layer, merge each tensor (in latent or weight space),
decode it with the target's VAE and write ``out_dir/layers/<group>.safetensors``.

Per tensor (latent space): load the operands' latents from the cache; align / resample the
non-target ones onto the target's latents when the models differ (or an alignment is asked);
run the operator; decode in batches with the *target's* VAE, then either

- ``decode: direct`` (the paper's ``W = D(z_merged)``): de-normalize with the *target*
  tensor's mean/std from its encode manifest, drop the padding, reshape, cast to the target's
  dtype; or
- ``decode: delta``: ``W = W_target + std_target · (D(z_merged) − D(z_target))``, per sample:
  samples whose merged latent equals the target's are not decoded and change nothing, so the
  VAE's reconstruction error cancels and ``z_merged == z_target`` gives ``W_target`` bit for
  bit. The sum is formed in float32 (float64 for float64 weights) and rounded once to the
  target's dtype.

Weight space: read the operands' tensors and run the same operator on them; under an output
vocabulary (``lsm_dist.merge.vocab``) the embeddings and head of each are permuted into it first.

A layer file is streamed tensor by tensor (one merged tensor in memory at a time) into a temp
file renamed when complete; it carries ``{"plan_digest", "group", "tensors"}`` in its
safetensors metadata: a re-run (after a crash, a
kill, a preempted array task) skips the files whose metadata matches this plan and redoes the
rest. Ranks / array tasks split the layers with ``worker = (index, count)``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from lsm_dist.checkpoint import DTYPES, Checkpoint, TensorInfo, nonfinite_count
from lsm_dist.chunking import STAT_BLOCK, denormalize
from lsm_dist.console import progress
from lsm_dist.dist import balanced_share
from lsm_dist.merge.encode import caches_for, make_cond, role_ids
from lsm_dist.merge.hetero import align_latents
from lsm_dist.merge.io import autocast, pick_device, read_meta, release_memory, write_streaming
from lsm_dist.merge.layout import SAFETENSORS_DTYPES
from lsm_dist.merge.operators import (
    apply_operator,
    apply_operator_stream,
    get_operator,
    make_generator,
)
from lsm_dist.model import TransformerVAE, load_vae
from lsm_dist.utils import get_logger

META_KEY = "lsm_merge"


class MergeError(ValueError):
    """A merged tensor is not finite or not of the target's shape (the message names it)."""
log = get_logger("lsm.merge")


def group_file(rp, group: str) -> Path:
    return rp.layers_dir / f"{group}.safetensors"


# temp name of a layer file being written (merge.io.write_streaming: mkstemp beside it)
_LAYER_TMP = re.compile(r"^\.[A-Za-z0-9_.-]+\.safetensors\.[A-Za-z0-9_]+\.tmp$")


def is_own_layer_entry(p: Path) -> bool:
    """A file of ``layers/`` this stage wrote: a layer file carrying our metadata, or the temp
    file of one (a run killed while writing)."""
    if p.is_symlink() or not p.is_file():
        return False
    return bool(_LAYER_TMP.match(p.name)) or (p.suffix == ".safetensors" and read_meta(p, META_KEY) is not None)


def clean_group_temps(rp, groups) -> int:
    """Remove the temp files a killed run left for ``groups`` (this worker's own layer files:
    no other worker writes them). Returns how many."""
    n = 0
    for g in groups:
        for p in rp.layers_dir.glob(f".{g}.safetensors.*.tmp"):
            if _LAYER_TMP.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


def group_done(rp, group: str) -> bool:
    """The layer file exists, is readable and was written by this plan for these tensors."""
    meta = read_meta(group_file(rp, group), META_KEY)
    return (meta is not None and meta.get("plan_digest") == rp.digest
            and sorted(meta.get("tensors", [])) == sorted(j.name for j in rp.groups[group]))


@torch.no_grad()
def decode_latents(vae: TransformerVAE, z: torch.Tensor, cond_info: tuple, roles: dict[str, int],
                   batch_size: int, device: torch.device) -> np.ndarray:
    """Latents (N, latent_tokens, latent_dim) → float32 samples (N, tokens, chunk)."""
    cfg = vae.cfg
    out = np.empty((z.shape[0], cfg.tokens, cfg.chunk), dtype=np.float32)
    for s in range(0, z.shape[0], batch_size):
        zb = z[s : s + batch_size].to(device)
        cond = make_cond(vae, zb.shape[0], *cond_info, roles, device)
        with autocast(device):
            x = vae.decode(zb, cond)
        out[s : s + zb.shape[0]] = x.float().cpu().numpy()
    return out


def merge_latent_tensor(rp, job, caches, vae: TransformerVAE, device: torch.device,
                        target: Checkpoint | None = None, base_ck: Checkpoint | None = None) -> torch.Tensor:
    """Merged and decoded target tensor ``job`` (shape and dtype of the target's); ``target``
    (the target's checkpoint) is read by ``decode: delta``, ``base_ck`` (the base's) by direct
    decoding of delta-encoded latents (``encoding: delta``)."""
    plan, tid = rp.plan, rp.plan.target
    op = get_operator(plan.method)
    z_t = None
    align = rp.heterogeneous or plan.alignment.latent_ot

    def operand(mid: str):
        nonlocal z_t
        mu, lv = caches[mid].load(job.sources[mid], logvar=op.needs_logvar)
        if mid != tid and align:
            if z_t is None:
                z_t, _ = caches[tid].load(job.sources[tid])
            gen = make_generator(plan.params.seed, f"align:{mid}:{job.name}")
            mu = align_latents(mu, z_t, plan.alignment, gen, what=f"{mid}->{tid} {job.name}")
        return mu, lv

    pairs = [operand(m) for m in job.inputs]
    base = operand(job.base)[0] if job.base is not None else None
    z = apply_operator(plan.method, [p[0] for p in pairs], job.params, base=base,
                       logvars=[p[1] for p in pairs] if op.needs_logvar else None, key=job.name)
    del pairs, base, z_t
    entry = caches[tid].manifest["tensors"].get(job.sources[tid])
    if entry is None:
        raise FileNotFoundError(f"latent manifest of {tid} has no entry for {job.name!r} (re-run encode)")
    roles = role_ids(rp.models[tid].vae)
    cond = (job.layer, job.block, job.role)
    if plan.decode == "delta":
        z_t = caches[tid].load(job.sources[tid])[0]
        return delta_decode(vae, z, z_t, target.read(job.sources[tid]), entry["std"], cond, roles,
                            plan.batch_size, device, what=job.name)
    x = decode_latents(vae, z, cond, roles, plan.batch_size, device)
    del z
    if plan.encoding == "delta":  # a decoded task vector, landed on the base
        tau = unchunk_blocks(x, job.shape, torch.float32, entry["mean"], entry["std"])
        return (base_ck.read(job.sources[plan.base]).float() + tau).to(DTYPES[job.dtype])
    return unchunk_blocks(x, job.shape, DTYPES[job.dtype], entry["mean"], entry["std"])


def delta_decode(vae: TransformerVAE, z: torch.Tensor, z_t: torch.Tensor, w_t: torch.Tensor, std: float,
                 cond_info: tuple, roles: dict[str, int], batch_size: int, device: torch.device,
                 what: str = "") -> torch.Tensor:
    """``W_t + std · (D(z) − D(z_t))`` (module doc); rows with ``z == z_t`` are exactly ``W_t``."""
    if tuple(z.shape) != tuple(z_t.shape):
        raise ValueError(f"{what}: merged latents {tuple(z.shape)} and the target's {tuple(z_t.shape)} differ")
    work = torch.float64 if w_t.dtype == torch.float64 else torch.float32
    out = w_t.reshape(-1).to(work, copy=True)
    moved = (z != z_t).reshape(z.shape[0], -1).any(dim=1).nonzero().squeeze(1)
    if moved.numel():
        d = decode_latents(vae, z[moved], cond_info, roles, batch_size, device)
        d -= decode_latents(vae, z_t[moved], cond_info, roles, batch_size, device)
        per = d[0].size
        full = np.zeros((z.shape[0], per), dtype=np.float32)
        full[moved.numpy()] = d.reshape(len(d), per)
        flat = torch.from_numpy(full.reshape(-1)[: out.numel()]).to(work)
        if flat.numel() < out.numel():
            raise ValueError(f"{what}: {flat.numel()} decoded values cannot cover {out.numel()} weights")
        out.add_(flat, alpha=float(std))
    return out.to(w_t.dtype).reshape(w_t.shape)


def unchunk_blocks(samples: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype, mean: float,
                   std: float, block: int = STAT_BLOCK) -> torch.Tensor:
    """``chunking.unchunk`` without fixups, de-normalized block by block (same values), so the
    float64 temporaries are one block, not the whole tensor."""
    numel = math.prod(shape)
    flat = samples.reshape(-1)
    if flat.size < numel:
        raise ValueError(f"{flat.size} decoded values cannot fill a tensor of shape {tuple(shape)}")
    out = torch.empty(numel, dtype=dtype)
    for a in range(0, numel, block):
        b = min(a + block, numel)
        out[a:b] = denormalize(flat[a:b], mean, std, dtype)
    return out.reshape(shape)


def _weight_dtypes(plan) -> tuple[torch.dtype | None, torch.dtype | None, torch.dtype]:
    """A weight merge's dtypes: ``cast`` (inputs rounded to ``plan.dtype`` first, as mergekit's
    ``dtype``), ``work`` (the operator's arithmetic dtype when ``arithmetic: dtype``) and
    ``wide``, the operator's working dtype (apply_operator): each input is widened to it once,
    where it is read, and checked there (a float32 check is a sum)."""
    cast = DTYPES[SAFETENSORS_DTYPES[plan.dtype]] if plan.dtype else None
    work = cast if plan.arithmetic == "dtype" else None
    return cast, work, work if work is not None and get_operator(plan.method).native_dtype else torch.float32


def merge_weight_tensor(rp, job, checkpoints: dict[str, Checkpoint]) -> torch.Tensor:
    """The weight-space baseline: the same operator on the weights themselves (inputs rounded
    to ``plan.dtype`` first when set, as mergekit's ``dtype``, then permuted into the output
    vocabulary when the tensor has one); a ``copy`` job reads its source."""
    plan = rp.plan
    if job.space == "copy":
        (m,) = job.inputs
        return checkpoints[m].read(job.sources[m]).to(DTYPES[job.dtype])
    cast, work, wide = _weight_dtypes(plan)
    if job.vocab is not None:  # the rows are permuted first, in the inputs' dtype, as mergekit does
        wide = None

    def read(m: str) -> torch.Tensor:
        x = checkpoints[m].read(job.sources[m])
        if cast is not None:
            x = x.to(cast)
        if wide is not None and x.is_floating_point():
            x = x.to(wide)
        if n_bad := nonfinite_count(x):
            raise MergeError(f"models.{m} ({checkpoints[m]!r}): tensor {job.sources[m]!r} holds "
                             f"{n_bad} NaN/Inf value(s)")
        return x

    if job.vocab is not None:  # each input in the output vocabulary first (mergekit: before the method)
        vs = rp.vocab.permute({m: read(m) for m in job.vocab}, job.vocab_base, job.name)
        xs, base = [vs[m] for m in job.inputs], (vs[job.base] if job.base is not None else None)
    else:
        xs = [read(m) for m in job.inputs]
        base = read(job.base) if job.base is not None else None
    out = apply_operator(plan.method, xs, job.params, base=base, key=job.name, dtype=work)
    return out.to(DTYPES[job.dtype])


def merge_weight_rows(rp, job, checkpoints: dict[str, Checkpoint]):
    """:func:`merge_weight_tensor` by row blocks (an iterator of the merged tensor's rows, the
    same values bit for bit), reading only those rows of each input: memory is a few row blocks,
    not the inputs' and output's whole tensors. None where the tensor is merged whole (a copy,
    a tensor in an output vocabulary, an operator that needs whole tensors)."""
    plan = rp.plan
    if job.space != "weight" or job.vocab is not None:
        return None
    cast, work, wide = _weight_dtypes(plan)
    shape = tuple(job.shape)
    for m in (*job.inputs, *([job.base] if job.base is not None else [])):
        got = tuple(checkpoints[m].tensors[job.sources[m]].shape)
        if got != shape:
            raise MergeError(f"models.{m} ({checkpoints[m]!r}): tensor {job.sources[m]!r} has shape {got}, "
                             f"the merge's is {shape}")

    checked: set[tuple[str, int, int]] = set()  # TIES reads each block more than once: checked once

    def reader(m: str):
        def read(a: int, b: int) -> torch.Tensor:
            x = checkpoints[m].read_rows(job.sources[m], a, b)
            if cast is not None:
                x = x.to(cast)
            if x.is_floating_point():
                x = x.to(wide)
            if (m, a, b) in checked:
                return x
            checked.add((m, a, b))
            if n_bad := nonfinite_count(x):
                raise MergeError(f"models.{m} ({checkpoints[m]!r}): tensor {job.sources[m]!r} holds "
                                 f"{n_bad} NaN/Inf value(s) (rows {a}..{b})")
            return x
        return read

    reads = [reader(m) for m in job.inputs]
    stream = apply_operator_stream(plan.method, len(reads), lambda i, a, b: reads[i](a, b),
                                   reader(job.base) if job.base is not None else None, shape,
                                   job.params, key=job.name, dtype=work)
    if stream is None:
        return None
    out = DTYPES[job.dtype]
    return (blk.to(out) for blk in stream)


def run_decode(rp, worker: tuple[int, int] = (0, 1), vaes: dict | None = None,
               bar: bool = False) -> dict[str, int]:  # fmt: skip
    """Write this worker's layer files (skipping finished ones) → {"written", "skipped"};
    ``bar``: a console bar over them."""
    idx, count = worker
    plan = rp.plan
    groups = list(rp.groups)
    mine = balanced_share(groups, [sum(math.prod(j.shape) for j in rp.groups[g]) for g in groups], idx, count)
    if rp.layers_dir.is_dir() and (n := clean_group_temps(rp, mine)):
        log.info("merge: removed %d temp file(s) of killed runs from %s", n, rp.layers_dir)
    todo = [g for g in mine if not group_done(rp, g)]
    stats = {"written": 0, "skipped": len(mine) - len(todo)}
    if not todo:
        return stats
    device = pick_device(plan.device)
    vae, caches = None, None
    checkpoints = {m: i.open() for m, i in rp.models.items()}
    if any(j.space == "latent" for g in todo for j in rp.groups[g]):
        caches = caches_for(rp)
        tvae = str(rp.models[plan.target].vae)
        vaes = {} if vaes is None else vaes
        if tvae not in vaes:
            vaes[tvae] = load_vae(tvae, map_location=device)
        vae = vaes[tvae]
    try:
        for g in progress(todo, initial=stats["skipped"], desc="merge", unit="layer", disable=not bar):
            jobs = {j.name: j for j in rp.groups[g]}
            infos = [TensorInfo(j.name, "", j.dtype, j.shape, j.layer, j.block, j.role, "weight")
                     for j in jobs.values()]

            def fetch(name: str, jobs=jobs) -> torch.Tensor:
                job = jobs[name]
                release_memory()  # the previous tensor's buffers are gone by now
                if job.space == "latent":
                    return merge_latent_tensor(rp, job, caches, vae, device, checkpoints[plan.target],
                                               checkpoints.get(plan.base))
                rows = merge_weight_rows(rp, job, checkpoints)
                return merge_weight_tensor(rp, job, checkpoints) if rows is None else rows

            meta = {"plan_digest": rp.digest, "group": g, "tensors": sorted(jobs)}
            write_streaming(group_file(rp, g), infos, fetch, {"format": "pt", META_KEY: json.dumps(meta)},
                            error=MergeError, atomic=True)
            stats["written"] += 1
            log.info("merge: wrote %s (%d tensors)", group_file(rp, g).name, len(infos))
            for ck in checkpoints.values():
                ck.close()
    finally:
        for ck in checkpoints.values():
            ck.close()
    return stats
