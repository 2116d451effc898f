"""The conversion plan: which tensor samples go into which shard, decided from headers alone.

The plan depends only on the checkpoints' headers and the conversion settings — not on the
number of workers — so a 1-worker and an N-worker conversion write identical shards, and any
worker (a local process, a rank, a Slurm array task) can compute its share independently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lsm_dist.adapters import open_ref
from lsm_dist.checkpoint import BLOCKS, Checkpoint
from lsm_dist.chunking import STORED, ChunkSpec
from lsm_dist.config import check, doc
from lsm_dist.utils import sha256_json

FORMAT_VERSION = 2  # what conversion writes
READ_VERSIONS = (1, 2)  # what the reader reads
BLOCK_IDS = {b: i for i, b in enumerate(BLOCKS)}
# ConvertConfig fields that are not part of a corpus' identity (plan["settings"])
_NOT_SETTINGS = ("models", "out_dir", "num_workers", "overwrite", "format_version")


@dataclass
class ConvertConfig:
    models: list[str] = doc(
        "checkpoints to convert: 'PATH' or 'ID=PATH' (a model dir with safetensors + index, or one .safetensors file)",
        factory=list,
    )
    out_dir: str = doc("corpus directory (manifest.json + shard-%06d.tar)", "runs/corpus")
    base: str | None = doc("delta corpus: the base checkpoint; every tensor is stored as the task vector "
                           "W - W_base (float32) of its model (lsm_dist.delta)", None)
    tokens: int = doc("tokens per sample (paper: 16)", 16)
    chunk: int = doc("values per token (paper: 640)", 640)
    block_samples: int = doc("samples per tar member (one array per block, never straddling tensors)", 256)
    shard_samples: int = doc("target samples per shard (a shard closes at the first block boundary past it)", 4096)
    blocks: list[str] = doc("tensor blocks to include: attn, mlp, other", factory=lambda: ["attn", "mlp"])
    include: str | None = doc("regex: keep only tensors whose name matches", None)
    exclude: str | None = doc("regex: drop tensors whose name matches", None)
    params: list[str] = doc("parameter kinds to include (weight, bias)", factory=lambda: ["weight"])
    strict_names: bool = doc("fail on tensor names that cannot be classified", True)
    max_padding_fraction: float = doc(
        "fail when zero padding would exceed this fraction of the corpus (sample too large for the tensors)", 0.5
    )
    num_workers: int = doc("local worker processes (ranks / array tasks split the work the same way)", 1)
    overwrite: bool = doc("replace a different corpus already in out_dir (only files a conversion wrote are removed)", False)
    format_version: int = doc(
        "corpus format to write: 2 = the tensors' own values in their dtype (bf16/fp16/fp32), "
        "standardized on read; 1 = standardized float32 samples + fixups (older corpora; for comparisons)",
        FORMAT_VERSION,
    )

    def __post_init__(self) -> None:
        check(self.tokens > 0, "tokens", f"must be positive, got {self.tokens}")
        check(self.chunk > 0, "chunk", f"must be positive, got {self.chunk}")
        check(self.block_samples > 0, "block_samples", f"must be positive, got {self.block_samples}")
        check(self.shard_samples >= self.block_samples, "shard_samples", "must be >= block_samples")
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(0.0 <= self.max_padding_fraction < 1.0, "max_padding_fraction", "must be in [0, 1)")
        for b in self.blocks:
            check(b in BLOCKS, "blocks", f"{b!r} is not one of {list(BLOCKS)}")
        check(len(self.blocks) > 0, "blocks", "select at least one block")
        check(self.format_version in READ_VERSIONS, "format_version", f"must be one of {list(READ_VERSIONS)}")
        check(self.base is None or self.format_version >= 2, "base", "delta corpora are format 2")

    @property
    def spec(self) -> ChunkSpec:
        return ChunkSpec(self.tokens, self.chunk)


def parse_model(entry: str) -> tuple[str, str]:
    """'ID=PATH' or 'PATH' → (id, path)."""
    from lsm_dist.adapters import resolve_ref

    if "=" in entry:
        mid, path = entry.split("=", 1)
    else:
        path = entry
        p = Path(path)
        mid = p.stem if p.suffix == ".safetensors" else p.name
    return mid, resolve_ref(path)  # a path, or BASE+ADAPTER (a peft LoRA adapter on its base)


def make_plan(cfg: ConvertConfig) -> dict:
    """Headers → tensors (with sample ranges) → shards (lists of blocks). No tensor data read."""
    if not cfg.models:
        raise ValueError("convert: no models given (models=[PATH, ...])")
    spec = cfg.spec
    models, tensors, roles = [], [], []
    seen_ids = set()
    base = delta = None
    if cfg.base is not None:
        bpath = str(Path(cfg.base).resolve())
        base = Checkpoint(bpath)
        from lsm_dist.checkpoint import content_digest

        delta = {"base": bpath, "base_digest": content_digest(base)}  # the bytes, not only the header
    for entry in cfg.models:
        mid, path = parse_model(entry)
        if mid in seen_ids:
            raise ValueError(f"convert: model id {mid!r} given twice; use ID=PATH to name them apart")
        seen_ids.add(mid)
        with open_ref(path) as ck:
            sel = ck.select(cfg.blocks, cfg.include, cfg.exclude, cfg.params, cfg.strict_names)
            if not sel:
                raise ValueError(f"{path}: no tensors match blocks={cfg.blocks} include={cfg.include!r} exclude={cfg.exclude!r}")
            if base is not None:
                from lsm_dist.delta import check_pairs

                check_pairs(ck, base, [t.name for t in sel], "convert: ")
            models.append({
                "id": mid,
                "path": path,
                "digest": ck.digest(),
                "dtypes": sorted({t.dtype for t in sel}),
                "num_layers": ck.num_layers,
                "architecture": (ck.config or {}).get("architectures", [None])[0],
                "model_type": (ck.config or {}).get("model_type"),
            })
            for t in sel:
                if t.numel == 0:
                    continue
                if cfg.format_version >= 2 and t.dtype not in STORED:
                    raise ValueError(
                        f"{t.file}: tensor {t.name} has dtype {t.dtype}; corpus format 2 stores "
                        f"{'/'.join(STORED)} values only (exclude it, or cast the checkpoint)"
                    )
                role = t.role or t.name
                if role not in roles:
                    roles.append(role)
                tensors.append({
                    "index": len(tensors),
                    "model": mid,
                    "name": t.name,
                    "file": str(Path(t.file).relative_to(ck.path)) if ck.path.is_dir() else "",
                    "layer": t.layer,
                    "block": t.block,
                    "role": role,
                    "param": t.param,
                    "shape": list(t.shape),
                    "dtype": "F32" if base is not None else t.dtype,  # a task vector is float32
                    "numel": t.numel,
                    "num_samples": spec.num_samples(t.numel),
                    "padding": spec.padding(t.numel),
                })
                if cfg.format_version >= 2:
                    tensors[-1]["stored_dtype"] = tensors[-1]["dtype"]  # the samples' bytes are the tensor's
    total = sum(t["num_samples"] for t in tensors) * spec.sample_size
    pad = sum(t["padding"] for t in tensors)
    if total and pad / total > cfg.max_padding_fraction:
        smallest = min(t["numel"] for t in tensors)
        raise ValueError(
            f"convert: tokens×chunk = {cfg.tokens}×{cfg.chunk} = {spec.sample_size} values does not fit these "
            f"tensors: {pad / total:.0%} of the corpus would be padding (max_padding_fraction="
            f"{cfg.max_padding_fraction}); smallest selected tensor has {smallest} values — use smaller tokens/chunk"
        )
    first = 0
    shards: list[dict] = []
    cur: list[list[int]] = []
    cur_n = 0
    for t in tensors:
        t["first_sample"] = first
        first += t["num_samples"]
        for s in range(0, t["num_samples"], cfg.block_samples):
            n = min(cfg.block_samples, t["num_samples"] - s)
            cur.append([t["index"], s, n])
            cur_n += n
            if cur_n >= cfg.shard_samples:
                shards.append({"name": f"shard-{len(shards):06d}.tar", "blocks": cur, "num_samples": cur_n})
                cur, cur_n = [], 0
    if cur:
        shards.append({"name": f"shard-{len(shards):06d}.tar", "blocks": cur, "num_samples": cur_n})
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_SETTINGS}
    plan = {
        "format": "lsm_dist.corpus",
        "format_version": cfg.format_version,
        "settings": settings,
        **({"sample_dtype": "float32"} if cfg.format_version == 1 else {}),
        "models": models,
        **({"delta": delta} if delta is not None else {}),
        "roles": roles,
        "blocks": list(BLOCKS),
        "tensors": tensors,
        "shards": shards,
        "num_samples": first,
    }
    # identity of the corpus: everything but where the sources happen to live
    ident = {**plan, "models": [{k: v for k, v in m.items() if k != "path"} for m in models]}
    ident["settings"] = {k: v for k, v in settings.items() if k != "base"}
    if delta is not None:
        ident["delta"] = {"base_digest": delta["base_digest"]}
    plan["plan_digest"] = sha256_json(ident)[:16]
    return plan


def worker_shards(n_shards: int, worker: int, num_workers: int) -> range:
    """Contiguous, balanced shard range of one worker (keeps a tensor's shards together)."""
    return range(worker * n_shards // num_workers, (worker + 1) * n_shards // num_workers)
