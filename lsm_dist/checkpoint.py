"""Lazy reader for Hugging Face checkpoints stored as safetensors (never pickle).

A checkpoint is a directory (``config.json`` + ``model.safetensors`` or sharded files with
``model.safetensors.index.json``) or a single ``.safetensors`` file. Headers are parsed and
validated up front (missing shard, truncated file, bad header) without reading tensor data;
tensors are read one at a time by offset (plain reads, no memory map: a long scan over a large
checkpoint must not keep the file's pages mapped into the process) so memory is bounded by one
tensor.

Tensor names are classified into (layer, block, role, param) for Llama / Qwen2 / Gemma-3 /
Mistral style names (and GPT-2 / Phi style ones); selection by block and regex raises
``UnknownTensorError`` naming any tensor that a block rule needs but cannot classify.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from lsm_dist.utils import atomic_write_json, read_json, sha256_json

INDEX_NAME = "model.safetensors.index.json"
# the files of a Hugging Face checkpoint beside its weights (config, generation, tokenizer)
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
             "added_tokens.json", "chat_template.jinja", "chat_template.json")  # fmt: skip

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")

BLOCKS = ("attn", "mlp", "other")

# module name -> block, for the module that owns the parameter
ROLE_BLOCK = {
    "q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
    "qkv_proj": "attn", "query_key_value": "attn", "dense": "attn", "out_proj": "attn",
    "c_attn": "attn", "wq": "attn", "wk": "attn", "wv": "attn", "wo": "attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "gate_up_proj": "mlp",
    "fc1": "mlp", "fc2": "mlp", "c_fc": "mlp", "w1": "mlp", "w2": "mlp", "w3": "mlp",
    "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp",
    "input_layernorm": "other", "post_attention_layernorm": "other",
    "pre_feedforward_layernorm": "other", "post_feedforward_layernorm": "other",
    "q_norm": "other", "k_norm": "other", "ln_1": "other", "ln_2": "other",
    "attention_norm": "other", "ffn_norm": "other", "layernorm": "other",
    "rotary_emb": "other",
}
# module names used inside both attention and MLP blocks (GPT-2's c_proj): the parent decides
SHARED_ROLES = {"c_proj"}
PARENT_BLOCK = {
    "self_attn": "attn", "attn": "attn", "attention": "attn", "self_attention": "attn",
    "mlp": "mlp", "feed_forward": "mlp", "ffn": "mlp",
}
GLOBAL_ROLES = {
    "embed_tokens": "embed", "wte": "embed", "wpe": "pos_embed", "tok_embeddings": "embed",
    "norm": "final_norm", "ln_f": "final_norm", "final_layernorm": "final_norm",
    "lm_head": "lm_head", "output": "lm_head", "rotary_emb": "rotary",
}
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or malformed (the message names the file)."""


class UnknownTensorError(ValueError):
    """Tensor names that a selection rule needs to classify but cannot."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # path of the safetensors file holding it
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    layer: int | None
    block: str | None  # attn | mlp | other | None (unclassified)
    role: str | None  # q_proj, gate_proj, embed, ... or None
    param: str  # weight | bias | ...
    offset: int = 0  # absolute byte offset of the data in ``file``

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=DTYPES[self.dtype]).element_size()


def classify(name: str) -> tuple[int | None, str | None, str | None, str]:
    """(layer, block, role, param) of a tensor name; block/role None when unknown."""
    parts = name.split(".")
    param = parts[-1]
    m = LAYER_RE.search(name)
    if m:
        layer = int(m.group(1))
        mods = m.group(2).split(".")[:-1]
        role = mods[-1] if mods else None
        block = ROLE_BLOCK.get(role) if role else None
        parents = [PARENT_BLOCK[m] for m in mods[:-1] if m in PARENT_BLOCK]
        if parents and (block in ("attn", "mlp") or role in SHARED_ROLES):
            # c_proj / dense exist in both attn and mlp: the owning module decides. A module
            # the tables do not know (self_attn.lora_A, self_attn.q_proj.base_layer) stays
            # unclassified (block None) even under self_attn / mlp: guessing would merge it
            # as attention or MLP weights; ``select`` names it instead
            block = parents[-1]
        return layer, block, role, param
    for mod in reversed(parts[:-1]):
        if mod in GLOBAL_ROLES:
            return None, "other", GLOBAL_ROLES[mod], param
    return None, None, None, param


# bits per element of every dtype the safetensors format defines (sizes are checked for all of
# them; tensors are *read* only in the dtypes of ``DTYPES``)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16,
              "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64,
              "I64": 64, "U64": 64, "F4": 4}  # fmt: skip
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _naturals(xs: object) -> bool:
    return isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)


def _entry_span(path: Path, name: str, h: object) -> tuple[int, int]:
    """(begin, end) data offsets of one header entry after checking dtype, shape and size."""
    if not isinstance(h, dict) or set(h) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: malformed header entry for tensor {name!r} (needs exactly "
                              f"dtype, shape, data_offsets; got {h!r:.200})")
    dtype, shape, offs = h["dtype"], h["shape"], h["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r} "
                              f"(safetensors dtypes: {', '.join(DTYPE_BITS)})")
    if not _naturals(shape):
        raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    if not _naturals(offs) or len(offs) != 2 or offs[0] > offs[1]:
        raise CheckpointError(f"{path}: tensor {name!r} has bad data_offsets {offs!r}")
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offs[1] - offs[0]:
        raise CheckpointError(
            f"{path}: tensor {name!r} is {dtype} {shape} = {bits / 8:g} bytes, but its data_offsets "
            f"{offs} span {offs[1] - offs[0]} bytes")
    return offs[0], offs[1]


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header without reading tensor data.

    Every entry is checked: a known dtype, a shape of non-negative ints, data offsets whose span
    is exactly numel × itemsize, and together the entries tile the data section with no gap,
    overlap or trailing bytes (the file ends where the last tensor ends). A ``CheckpointError``
    names the file and the tensor. Returns (header, byte offset where the data section starts).
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: safetensors file does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (length {n}, file {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, duplicate keys
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: header __metadata__ must map strings to strings")
    spans = sorted((*_entry_span(path, k, v), k) for k, v in header.items() if k != "__metadata__")
    data = size - 8 - n
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin != pos:
            what = (f"overlaps {prev!r}" if begin < pos else f"leaves {begin - pos} unused bytes after "
                    + (repr(prev) if prev else "the header"))  # fmt: skip
            raise CheckpointError(f"{path}: tensor {name!r} (data_offsets [{begin}, {end}]) {what}: "
                                  "offsets must be contiguous")
        pos, prev = end, name
    if pos > data:
        raise CheckpointError(
            f"{path}: truncated safetensors file: header needs {8 + n + pos} bytes, file has {size}"
            + (f" (tensor {prev!r} ends past the end)" if prev else ""))
    if pos < data:
        raise CheckpointError(f"{path}: {data - pos} bytes after the last tensor's data "
                              "(corrupt file or a header that does not describe it)")
    return header, 8 + n


def _require_dir(path: str | Path) -> None:
    p = Path(path)
    if not p.is_dir():  # else transformers takes the path for a hub repo id
        why = "a symlink loop" if p.is_symlink() and not p.exists() else "no such directory"
        raise CheckpointError(f"{p} is not a checkpoint directory ({why})")


def load_causal_lm(path: str | Path, dtype: str | torch.dtype | None = "auto"):
    """``AutoModelForCausalLM`` from a local checkpoint directory with nothing of it executed or
    unpickled: ``trust_remote_code=False`` (code named by a config's ``auto_map`` is never
    imported), safetensors weights only (``use_safetensors``: never ``pytorch_model.bin``) and
    local files only (a path is never taken for a hub id). The directory is checked first by
    :class:`Checkpoint` (which files make it, every header entry, the weights' dtypes) and the
    loaded parameters for NaN/Inf, so every reader of a model gets the same checks."""
    from transformers import AutoModelForCausalLM

    _require_dir(path)
    _require_known_architecture(path)
    with Checkpoint(path) as ck:  # the one file rule, every header entry, the weights' dtypes
        bad = ck.weight_dtype_problems()
    if bad:
        raise CheckpointError(f"{path}: {bad[0]}")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False,
                                                 use_safetensors=True, local_files_only=True)
    for name, p in model.named_parameters():
        if n_bad := nonfinite_count(p.detach()):
            raise CheckpointError(f"{path}: parameter {name!r} holds {n_bad} NaN/Inf value(s) once loaded")
    return model


def nonfinite_count(x: torch.Tensor) -> int:
    """How many NaN / ±Inf values ``x`` holds (0 for a non-float tensor), fast on the common
    all-finite case: float32 / float64 by their sum (a NaN or Inf anywhere makes it non-finite, so
    a finite sum proves every value finite; 30x faster than ``isfinite().all()``), 16-bit floats
    by their exponent bits (all ones: NaN or Inf; 2.6x faster); the exact count otherwise."""
    if not x.is_floating_point():
        return 0
    if x.dtype in (torch.float32, torch.float64):
        if bool(torch.isfinite(x.sum())):
            return 0
    elif x.dtype in (torch.bfloat16, torch.float16):
        mask = 0x7F80 if x.dtype == torch.bfloat16 else 0x7C00
        if not bool(((x.reshape(-1).view(torch.int16) & mask) == mask).any()):
            return 0
    return int((~torch.isfinite(x)).sum())


def _require_known_architecture(path: str | Path) -> None:
    """A config.json whose ``model_type`` this transformers does not know would get transformers'
    advice to pass ``trust_remote_code=True`` (and an hf.co link made of a local path): lsm_dist
    runs no model code it is handed, so say that instead."""
    import transformers
    from transformers import CONFIG_MAPPING

    cfg = Path(path) / "config.json"
    try:
        mt = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # transformers' own message about a missing / unreadable config is clear enough
    if isinstance(mt, str) and mt not in CONFIG_MAPPING:
        raise CheckpointError(f"{cfg}: model_type {mt!r} is not an architecture transformers "
                              f"{transformers.__version__} knows; lsm_dist never runs a checkpoint's own model "
                              "code (remote code), so it cannot load this model")


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, local files only, no remote code (see :func:`load_causal_lm`)."""
    from transformers import AutoTokenizer

    _require_dir(path)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)


def write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` as safetensors to the open file ``f``, byte-deterministically.

    ``safetensors.torch.save`` serializes ``__metadata__`` from a hash map, so its key order
    (and the file's sha256) changes from call to call; here the metadata keys are sorted (tensor
    entries and data are already in a fixed order), so the same tensors and metadata always give
    the same bytes."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    if meta is not None:
        header = {"__metadata__": dict(sorted(meta.items())), **header}
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    hb += b" " * (-len(hb) % 8)
    f.write(struct.pack("<Q", len(hb)))
    f.write(hb)
    f.write(memoryview(blob)[8 + n:])


class Checkpoint:
    """Lazy view of a safetensors checkpoint (directory or single file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: checkpoint does not exist")
        self.config: dict | None = None
        files = self._files()
        self.tensors: dict[str, TensorInfo] = {}
        self._metadata: dict[str, dict] = {}
        for file, wanted in files.items():
            header, base = read_safetensors_header(file)
            self._metadata[str(file)] = header.get("__metadata__", {}) or {}
            for name, h in header.items():
                if name == "__metadata__" or (wanted is not None and name not in wanted):
                    continue
                layer, block, role, param = classify(name)
                self.tensors[name] = TensorInfo(
                    name, str(file), h["dtype"], tuple(int(s) for s in h["shape"]),
                    layer, block, role, param, base + int(h["data_offsets"][0]),
                )
                if h["dtype"] not in DTYPES:
                    raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {h['dtype']}")
            if wanted is not None:
                missing = sorted(set(wanted) - set(header))
                if missing:
                    raise CheckpointError(
                        f"{file}: index {INDEX_NAME} lists {len(missing)} tensor(s) this file lacks, e.g. {missing[:3]}"
                    )

    def _files(self) -> dict[Path, set[str] | None]:
        p = self.path
        if p.is_file():
            if p.suffix != ".safetensors":
                raise CheckpointError(f"{p}: only .safetensors files are read (never pickle checkpoints)")
            return {p: None}
        cfg = p / "config.json"
        if cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg}: not valid JSON: {e}") from None
        index = p / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            by_file: dict[Path, set[str]] = {}
            for name, fname in weight_map.items():
                by_file.setdefault(p / fname, set()).add(name)
            single = p / "model.safetensors"
            if (single.exists() or single.is_symlink()) and single not in by_file:
                # transformers loads model.safetensors and ignores the index; lsm read the shards:
                # one rule for every reader -- an ambiguous directory is refused
                raise CheckpointError(f"{p}: holds both {single.name} and the sharded index {INDEX_NAME}, which "
                                      f"does not list it (transformers would load {single.name}, the index names "
                                      "other files): remove one of them")
            for f in by_file:
                if not f.is_file():
                    raise CheckpointError(f"{index}: points to shard {f.name}, which does not exist")
            return dict(sorted(by_file.items()))
        single = p / "model.safetensors"
        if single.is_file():
            return {single: None}
        found = sorted(p.glob("*.safetensors"))
        if not found:
            bins = sorted(p.glob("*.bin")) + sorted(p.glob("*.pt"))
            hint = f" ({bins[0].name} is a pickle file, never loaded: convert it to safetensors)" if bins else ""
            raise CheckpointError(f"{p}: no safetensors files{hint}")
        return {f: None for f in found}

    # -- metadata ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def digest(self) -> str:
        """Stable digest of the config and tensor header (names, shapes, dtypes)."""
        heads = [(t.name, t.dtype, list(t.shape)) for t in self.tensors.values()]
        return sha256_json({"config": self.config, "tensors": heads})[:16]

    def source_files(self) -> list[str]:
        """The files whose bytes make up this model: its safetensors files and config.json."""
        files = sorted({t.file for t in self.tensors.values()})
        cfg = self.path / "config.json" if self.path.is_dir() else None
        if cfg is not None and cfg.is_file():
            files.append(str(cfg))
        return files

    @property
    def num_layers(self) -> int:
        layers = [t.layer for t in self.tensors.values() if t.layer is not None]
        return max(layers) + 1 if layers else 0

    def select(
        self,
        blocks: Iterable[str] = ("attn", "mlp"),
        include: str | None = None,
        exclude: str | None = None,
        params: Iterable[str] = ("weight",),
        strict: bool = True,
        mixed_dtypes: bool = False,
    ) -> list[TensorInfo]:
        """Tensors in the chosen blocks (and matching ``include`` / not ``exclude`` regex).

        With ``strict`` an unclassifiable name that survives the regex filters is an error,
        since the block rule cannot tell whether it belongs to the selection. Weights of an
        integer dtype are always an error; ``mixed_dtypes`` accepts float weights of several
        dtypes (a reader that describes each tensor as it is, e.g. ``lsm stats``).
        """
        blocks = tuple(blocks)
        for b in blocks:
            if b not in BLOCKS:
                raise ValueError(f"unknown block {b!r}; known blocks: {list(BLOCKS)}")
        params = tuple(params)
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
        out, unknown = [], []
        for t in self.tensors.values():
            if inc and not inc.search(t.name):
                continue
            if exc and exc.search(t.name):
                continue
            if t.block is None:
                if inc is not None and not strict:
                    out.append(t)
                else:
                    unknown.append(t.name)
                continue
            if t.block in blocks and t.param in params:
                out.append(t)
        bad = self.weight_dtype_problems(out, mixed_dtypes)
        if bad:
            raise CheckpointError(f"{self.path}: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        if unknown and strict:
            lora = any(".lora_" in n for n in unknown)
            raise UnknownTensorError(
                f"{self.path}: cannot classify {len(unknown)} tensor name(s) into attn/mlp/other: "
                f"{unknown[:5]}; exclude them with a regex (exclude=...) or name them with include=..."
                + (" (lora_A / lora_B are adapter factors, not model weights: merge the adapter "
                   "into its base model first)" if lora else "")
            )
        return out

    def weight_dtype_problems(self, infos: Iterable[TensorInfo] | None = None,
                              mixed_dtypes: bool = False) -> list[str]:
        """What is wrong with the dtypes of the attention / MLP weight matrices (all of them, or
        ``infos``): an integer or boolean dtype in a weight position (a float tensor whose header
        was relabelled to a type of the same size reads as garbage), or a dtype that differs
        from the one most of the model's weights have."""
        ws = [t for t in (infos if infos is not None else self.tensors.values())
              if t.block in ("attn", "mlp") and t.param == "weight"]
        out = [f"tensor {t.name!r} has dtype {t.dtype} in a weight position (weights are floating point; "
               "a relabelled header?)" for t in ws if t.dtype not in FLOAT_DTYPES]
        floats = [t for t in ws if t.dtype in FLOAT_DTYPES]
        if floats and not mixed_dtypes:
            from collections import Counter

            common, n = Counter(t.dtype for t in floats).most_common(1)[0]
            out += [f"tensor {t.name!r} has dtype {t.dtype}, the model's other {n} weights {common}"
                    for t in floats if t.dtype != common]
        return out

    # -- data -------------------------------------------------------------------------
    def _read(self, info: TensorInfo, start: int, length: int, out: bytearray | None = None) -> torch.Tensor:
        """``length`` bytes at ``start`` within the tensor's data, as a flat tensor of its dtype
        (a view of ``out`` when given: a buffer of at least ``length`` bytes)."""
        dtype = DTYPES[info.dtype]
        buf = bytearray(length) if out is None else memoryview(out)[:length]
        try:
            with open(info.file, "rb", buffering=0) as f:
                f.seek(info.offset + start)
                got = f.readinto(buf) if length else 0
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r}: {e}") from None
        if got != length:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
        return torch.frombuffer(buf, dtype=dtype) if length else torch.empty(0, dtype=dtype)

    def read(self, name: str, out: bytearray | None = None) -> torch.Tensor:
        """One tensor in its stored dtype (only its bytes are read; the tensor owns its memory,
        or is a view of ``out``, a buffer a caller reuses across tensors: no fresh pages)."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return self._read(info, 0, info.nbytes, out).reshape(info.shape)

    def read_rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` of a tensor (its first axis; a 0-d tensor is one row), read by byte
        range: only those bytes are read."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        rows = info.shape[0] if info.shape else 1
        if not 0 <= a <= b <= rows:
            raise IndexError(f"{self.path}: rows [{a}, {b}) of {name!r}, which has {rows}")
        row_bytes = info.nbytes // max(rows, 1)
        return self._read(info, a * row_bytes, (b - a) * row_bytes).reshape(b - a, *info.shape[1:])

    def iter_rows(self, name: str, max_elems: int = 1 << 22) -> Iterator[torch.Tensor]:
        """Row blocks of a tensor, read by byte range: memory bounded by ``max_elems``."""
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 1
        step = max(1, max_elems // max(info.numel // max(rows, 1), 1))
        for a in range(0, rows, step):
            yield self.read_rows(name, a, min(a + step, rows))

    def check_finite(self, names: Iterable[str] | None = None, max_elems: int = 1 << 22) -> None:
        """``CheckpointError`` naming the file and tensor when a floating tensor among ``names``
        (default: all) holds NaN/Inf; read by row blocks, so memory stays bounded."""
        for name in self.tensors if names is None else names:
            info = self.tensors[name]
            if info.dtype not in FLOAT_DTYPES:
                continue
            bad = sum(int((~torch.isfinite(b)).sum()) for b in self.iter_rows(name, max_elems))
            if bad:
                raise CheckpointError(f"{info.file}: tensor {name!r} holds {bad} NaN/Inf value(s)")

    def close(self) -> None:
        """Nothing stays open between reads; kept for the context-manager protocol."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"


def identity_digest(ck: Checkpoint) -> str:
    """A checkpoint's identity by its files (``Checkpoint.source_files``: real path, size,
    modification time in ns, inode) and its headers (names, shapes, dtypes): what the content
    digest's memo already trusts on a re-run, without reading the weights (a weight-space
    merge's plan digest; latent caches stay keyed on :func:`content_digest`). A file written
    again gets a new mtime, a copy a new path and inode: either is another identity."""
    files = []
    for f in ck.source_files():
        st = os.stat(f)
        files.append([Path(f).name, os.path.realpath(f), st.st_size, st.st_mtime_ns, st.st_ino])
    return sha256_json({"files": files, "headers": ck.digest()})[:16]


def _sha256_file(path: str) -> str:
    fh = hashlib.sha256()
    with open(path, "rb") as fp:
        while buf := fp.read(1 << 22):
            fh.update(buf)
    return fh.hexdigest()


def content_digest(ck: Checkpoint, memo_dir: str | Path | None = None) -> str:
    """sha256 over every file of ``ck`` (``Checkpoint.source_files``: config.json, the
    safetensors files, a LoRA adapter's files) (memoized per file by
    path, size and mtime in ``<memo_dir>/digests.json`` so a re-run does not re-read)."""
    files = ck.source_files()
    memo_path = Path(memo_dir) / "digests.json" if memo_dir else None
    memo = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = read_json(memo_path)
        except ValueError:
            memo = {}
    stale = {}
    for f in files:
        st = os.stat(f)
        stamp = [st.st_size, st.st_mtime_ns]
        if memo.get(os.path.realpath(f), {}).get("stat") != stamp:
            stale[os.path.realpath(f)] = stamp
    if stale:  # files hashed side by side (hashlib and reads release the GIL): a pair of shards at once
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(len(stale), os.cpu_count() or 1, 8))) as pool:
            for key, digest in zip(stale, pool.map(_sha256_file, stale)):
                memo[key] = {"stat": stale[key], "sha256": digest}
    changed = bool(stale)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{Path(f).name}:{memo[os.path.realpath(f)]['sha256']}\n".encode())
    if changed and memo_path is not None:
        atomic_write_json(memo_path, memo)
    return h.hexdigest()[:16]
