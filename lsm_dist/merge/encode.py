"""Encode models into per-tensor latents with a VAE (contract 3), cached by content hash.

Cache layout, one directory per (model content, VAE content)::

    <cache_dir>/<model_digest>-<vae_digest>/
        tensors/<tensor name>.safetensors   # "mu" (+ "logvar" when a plan needs it): (samples, latent_tokens, latent_dim)
        manifest.json                       # name -> file, shape, dtype, mean, std, num_samples, ...

Each tensor file carries its manifest entry in its safetensors metadata, so a tensor is
reused when its file exists with matching metadata (a repeated merge encodes nothing), the
work can be split across ranks / array tasks (each writes its own files atomically) and the
manifest is rebuilt from the files by one final step (:func:`finalize_encode`).

A tensor is standardized and chunked exactly like the corpus (``lsm_dist.chunking``), one
batch of samples at a time: the working set is the tensor, its float32 copy, one batch and
the latents (never a whole model).
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open

from lsm_dist.checkpoint import ROLE_BLOCK, Checkpoint, nonfinite_count
from lsm_dist.chunking import ChunkSpec, norm_stats, normalize_range
from lsm_dist.console import progress
from lsm_dist.dist import balanced_share
from lsm_dist.merge.io import atomic_save, autocast, pick_device, read_meta, release_memory
from lsm_dist.merge.operators import get_operator
from lsm_dist.model import BLOCK_IDS, TransformerVAE, load_vae
from lsm_dist.utils import atomic_write_json, get_logger

FORMAT = "lsm_dist.latents.v1"
LATENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CANONICAL_ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
log = get_logger("lsm.merge")


def role_ids(vae_dir: str | Path | None) -> dict[str, int]:
    """Role → id for conditioned VAEs: ``<vae>/roles.json`` (the training corpus's role list)
    when present, else the Llama order q,k,v,o,gate,up,down then the other known roles."""
    if vae_dir is not None and (Path(vae_dir) / "roles.json").is_file():
        roles = json.loads((Path(vae_dir) / "roles.json").read_text())
    else:
        roles = CANONICAL_ROLES + [r for r in ROLE_BLOCK if r not in CANONICAL_ROLES]
    return {r: i for i, r in enumerate(roles)}


def make_cond(vae: TransformerVAE, n: int, layer: int | None, block: str, role: str | None,
              roles: dict[str, int], device: torch.device) -> dict[str, torch.Tensor] | None:
    """Conditioning ids for ``n`` samples of one tensor (None for an unconditioned VAE)."""
    cfg = vae.cfg
    if cfg.cond == "none":
        return None
    rid = roles.get(role or "", 0)
    if rid >= cfg.num_roles:
        raise ValueError(f"role {role!r} has id {rid}, the VAE knows {cfg.num_roles} roles")

    def full(v: int) -> torch.Tensor:
        return torch.full((n,), v, dtype=torch.long, device=device)

    return {"layer": full(-1 if layer is None else layer), "block": full(BLOCK_IDS[block]), "role": full(rid)}


def latents_sha256(mu: torch.Tensor, lv: torch.Tensor | None) -> str:
    """sha256 of the stored latents' bytes (mu, then logvar when stored): recorded at encode,
    checked at load."""
    import hashlib

    h = hashlib.sha256()
    for x in (mu, lv) if lv is not None else (mu,):
        x = x.contiguous()
        h.update(x.view(torch.uint8).numpy().tobytes() if x.dtype != torch.bfloat16 else
                 x.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """The latents of one model under one VAE."""

    def __init__(self, root: str | Path, model_digest: str, vae_digest: str):
        self.root = Path(root)
        self.model_digest, self.vae_digest = model_digest, vae_digest
        self.dir = self.root / f"{model_digest}-{vae_digest}"
        self._manifest: dict | None = None

    def tensor_path(self, name: str) -> Path:
        return self.dir / "tensors" / f"{name}.safetensors"

    def entry(self, name: str) -> dict | None:
        """Manifest entry of a tensor from its file's metadata (None if absent or stale; a file of
        an older version, without the latents' checksum, is stale: it is encoded again)."""
        meta = read_meta(self.tensor_path(name))
        if meta is None or meta.get("format") != FORMAT or meta.get("name") != name or "sha256" not in meta:
            return None
        if meta.get("model_digest") != self.model_digest or meta.get("vae_digest") != self.vae_digest:
            return None
        return meta

    def has(self, name: str, latent_dtype: str, logvar: bool = False) -> bool:
        """Valid latents of ``name`` in ``latent_dtype`` (with the log-variances when ``logvar``)."""
        e = self.entry(name)
        return e is not None and e.get("latent_dtype") == latent_dtype and (not logvar or e.get("logvar", True))

    def load(self, name: str, logvar: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mu, logvar or None) as float32 CPU tensors."""
        path = self.tensor_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"latent cache {self.dir}: no latents for {name!r} (run the encode stage)")
        with safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            if logvar and "logvar" not in stored:
                raise FileNotFoundError(f"{path}: encoded without log-variances, which this merge method needs "
                                        "(run the encode stage of this plan: it encodes them)")
            mu = f.get_tensor("mu")
            lv = f.get_tensor("logvar") if "logvar" in stored else None
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        if latents_sha256(mu, lv) != meta.get("sha256"):
            raise ValueError(f"{path}: the latents do not match the checksum the encode stage recorded "
                             "(edited or corrupt cache file): delete it and run the encode stage again")
        return mu.float(), (lv.float() if logvar else None)

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            path = self.dir / "manifest.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist (run the encode stage and its finalize step)")
            self._manifest = json.loads(path.read_text())
        return self._manifest

    def write_manifest(self, source: dict) -> dict:
        """Scan the tensor files and write ``manifest.json`` (the finalize step)."""
        tensors = {}
        for f in sorted((self.dir / "tensors").glob("*.safetensors")):
            name = f.name[: -len(".safetensors")]
            e = self.entry(name)
            if e is not None:
                tensors[name] = {"file": f"tensors/{f.name}", **e}
        man = {"format": FORMAT, "model_digest": self.model_digest, "vae_digest": self.vae_digest,
               "source": source, "tensors": tensors}
        atomic_write_json(self.dir / "manifest.json", man)
        self._manifest = man
        return man


@torch.no_grad()
def encode_tensor(vae: TransformerVAE, t: torch.Tensor, cond_info: tuple, roles: dict[str, int],
                  batch_size: int, device: torch.device, latent_dtype: torch.dtype = torch.float32,
                  stats: tuple[float, float] | None = None, logvar: bool = True):
    """One tensor → (mu, logvar, mean, std): latents (samples, latent_tokens, latent_dim);
    standardized with its own (mean, std), or with ``stats`` (delta encoding's shared scale).
    Without ``logvar`` the log-variances are neither computed nor held (logvar is None)."""
    cfg = vae.cfg
    spec = ChunkSpec(cfg.tokens, cfg.chunk)
    t32 = t.float() if t.dtype != torch.float32 else t  # one float32 copy; batches are views of it
    mean, std = norm_stats(t32) if stats is None else stats
    n = spec.num_samples(t32.numel())
    mu = torch.empty((n, *cfg.latent_shape), dtype=latent_dtype)
    lv = torch.empty_like(mu) if logvar else None
    layer, block, role = cond_info
    ctx = autocast(device) if device.type == "cuda" else nullcontext()
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        x = normalize_range(t32, mean, std, s * spec.sample_size, (s + b) * spec.sample_size)
        x = torch.from_numpy(x).reshape(b, cfg.tokens, cfg.chunk).to(device)
        cond = make_cond(vae, b, layer, block, role, roles, device)
        with ctx:
            m, v = vae.encode(x, cond, logvar=logvar)
        mu[s : s + b] = m.float().cpu().to(latent_dtype)
        if lv is not None:
            lv[s : s + b] = v.float().cpu().to(latent_dtype)
    return mu, lv, mean, std


def encode_names(ck: Checkpoint, names: list[str], vae: TransformerVAE, vae_dir: Path,
                 cache: LatentCache, batch_size: int = 256, device: torch.device | None = None,
                 latent_dtype: str = "float32", base: Checkpoint | None = None,
                 logvar: bool = False) -> dict[str, int]:
    """Encode ``names`` of ``ck`` into ``cache`` (skipping valid cached ones) → counts. With
    ``base`` (delta encoding, ``vae.cfg.delta`` set) the task vectors ``W − W_base`` are encoded
    at the shared scale ``gain · std(W_base)`` (``lsm_dist.delta``). The log-variances are
    stored only with ``logvar`` (a method that samples the posterior needs them; the others read
    the means alone: half the cache's disk)."""
    device = device or pick_device("auto")
    roles = role_ids(vae_dir)
    cfg = vae.cfg
    spec = ChunkSpec(cfg.tokens, cfg.chunk)
    stats = {"encoded": 0, "reused": 0, "samples": 0}
    for name in names:
        if cache.has(name, latent_dtype, logvar):
            stats["reused"] += 1
            continue
        info = ck.tensors[name]
        t = ck.read(name)
        ck.close()  # drop the mmap: resident memory stays one tensor, not the touched file pages
        if n_bad := nonfinite_count(t):
            raise ValueError(f"{ck!r}: tensor {name!r} holds {n_bad} NaN/Inf value(s); cannot encode it")
        scale = None
        if base is not None:
            w_base = base.read(name).float()
            scale = (0.0, float(vae.cfg.delta["gain"]) * norm_stats(w_base)[1])
            t = t.float() - w_base
            del w_base
        block = info.block if info.block in BLOCK_IDS else "other"
        mu, lv, mean, std = encode_tensor(vae, t, (info.layer, block, info.role), roles, batch_size,
                                          device, LATENT_DTYPES[latent_dtype], scale, logvar)
        meta = {
            "format": FORMAT, "name": name, "source": str(ck.path), "shape": list(info.shape),
            "dtype": info.dtype, "mean": mean, "std": std, "num_samples": int(mu.shape[0]),
            "padding": spec.padding(info.numel), "layer": info.layer, "block": info.block,
            "role": info.role, "tokens": cfg.tokens, "chunk": cfg.chunk,
            "latent_shape": list(cfg.latent_shape), "latent_dtype": latent_dtype,
            "model_digest": cache.model_digest, "vae_digest": cache.vae_digest, "logvar": logvar,
            "sha256": latents_sha256(mu, lv),
        }  # fmt: skip
        atomic_save({"mu": mu, "logvar": lv} if logvar else {"mu": mu}, cache.tensor_path(name),
                    {"format": FORMAT, "meta": json.dumps(meta)})
        stats["encoded"] += 1
        stats["samples"] += int(mu.shape[0])
        del t, mu, lv
        release_memory()
    return stats


# ------------------------------------------------------------------------ plan stages
def caches_for(rp) -> dict[str, LatentCache]:
    """The latent cache of every operand model of a resolved plan."""
    root = Path(rp.plan.cache_dir)
    return {m: LatentCache(root, i.digest, i.vae_digest) for m, i in rp.models.items()}


def encode_work(rp) -> list[tuple[str, str]]:
    """(model id, tensor name) pairs a plan's latent-space jobs need, in a stable order."""
    return list(dict.fromkeys((m, j.sources[m]) for m in rp.models for j in rp.jobs
                              if j.space == "latent" and m in j.sources))


def run_encode(rp, worker: tuple[int, int] = (0, 1), vaes: dict | None = None,
               finalize: bool | None = None, bar: bool = False) -> dict[str, int]:
    """This worker's share of the encode work (``worker = (index, count)``, e.g. from
    ``read_env().worker_slot()``); a single worker also finalizes the manifests. ``bar``: a
    console bar over the tensors (advancing per model)."""
    idx, count = worker
    caches = caches_for(rp)
    device = pick_device(rp.plan.device)
    vaes = {} if vaes is None else vaes
    work = encode_work(rp)
    needs_logvar = get_operator(rp.plan.method).needs_logvar
    size = {(m, j.sources[m]): math.prod(j.shape) for j in rp.jobs for m in j.sources}  # the cost of encoding it
    mine = balanced_share(work, [size.get(w, 1) for w in work], idx, count)
    totals = {"encoded": 0, "reused": 0, "samples": 0}
    shown = progress(total=len(mine), desc="encode", unit="tensor", disable=not bar)
    try:
        for mid in rp.models:
            names = [n for m, n in mine if m == mid]
            if not names:
                continue
            info = rp.models[mid]
            vae = vaes.get(str(info.vae))
            if vae is None and any(not caches[mid].has(n, rp.plan.latent_dtype, needs_logvar) for n in names):
                vae = vaes[str(info.vae)] = load_vae(info.vae, map_location=device)
            if vae is None:  # everything cached: no need to load the VAE
                totals["reused"] += len(names)
                shown.update(len(names))
                continue
            base = rp.models[rp.plan.base].open() if rp.plan.encoding == "delta" else None
            with info.open() as ck:
                try:
                    s = encode_names(ck, names, vae, info.vae, caches[mid], rp.plan.batch_size, device,
                                     rp.plan.latent_dtype, base, needs_logvar)
                except ValueError as e:
                    raise ValueError(f"models.{mid}: {e}") from None
            log.info("encode %s: %d tensor(s) encoded, %d reused", mid, s["encoded"], s["reused"])
            shown.update(len(names))
            for k in totals:
                totals[k] += s[k]
    finally:
        shown.close()
    if finalize if finalize is not None else count == 1:
        finalize_encode(rp)
    return totals


def finalize_encode(rp) -> dict[str, LatentCache]:
    """Check every needed tensor was encoded, then write each model's manifest."""
    caches = caches_for(rp)
    needs_logvar = get_operator(rp.plan.method).needs_logvar
    missing = [(m, n) for m, n in encode_work(rp) if not caches[m].has(n, rp.plan.latent_dtype, needs_logvar)]
    if missing:
        raise FileNotFoundError(f"encode: {len(missing)} tensor(s) have no latents yet, e.g. {missing[:3]} "
                                "(has every worker of the encode stage finished?)")
    for m, c in caches.items():
        info = rp.models[m]
        c.write_manifest({"model": str(info.path), "lora": str(info.lora) if info.lora else None,
                          "vae": str(info.vae)})
    return caches
