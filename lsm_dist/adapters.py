"""peft LoRA adapters as merge inputs: a base checkpoint with an adapter applied lazily.

``open_model(base, lora=ADAPTER_DIR)`` returns an :class:`AdaptedCheckpoint`: the base
:class:`~lsm_dist.checkpoint.Checkpoint` whose ``read`` of an adapted tensor returns
``W + scale · (B @ A)`` (``scale = lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora``;
per-module ``rank_pattern`` / ``alpha_pattern`` as peft matches them), computed as peft's
``merge_and_unload`` does (the product in float32, rounded to the adapter's dtype, added to
the weight in float32 and rounded once to the base dtype, as ``W += delta`` does), one tensor
at a time: memory stays bounded by one tensor. Every other tensor reads from the base unchanged. mergekit writes the same input as ``model: BASE+ADAPTER``
(:func:`split_model_ref`).

The adapter directory is peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``
(keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``). Everything is checked
before any tensor is read: the config has ``r``, ``lora_alpha`` and ``target_modules``; no
feature whose merged weight is not ``W + scale·BA`` (DoRA, LoRA biases, ``modules_to_save``,
trainable tokens, embedding LoRA, other peft types) -- each is refused by name; every adapted
module exists in the base with a weight of the shape ``B @ A`` produces (an adapter made for
another base fails naming the tensor). Only safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from lsm_dist.checkpoint import DTYPES, Checkpoint, CheckpointError, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# config keys whose non-default value changes what merging the adapter means
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA biases",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "target_parameters": "LoRA on nn.Parameter targets",
}


class AdapterError(ValueError):
    """An adapter directory is malformed, unsupported, or made for another base (named)."""


def split_model_ref(ref: str) -> tuple[str, str | None]:
    """``"BASE+ADAPTER"`` (mergekit's syntax) → ``(BASE, ADAPTER)``; a plain path → ``(path, None)``.

    A ``+`` inside an existing path is part of the path: the string splits only when it does
    not exist as a whole and both sides do. A GGUF base (``*.gguf`` or ``PACKAGE:FILE.gguf``)
    becomes its float32 safetensors import (``zoo.gguf.import_cached``: once, then cached).
    """
    from lsm_dist.zoo.gguf import import_cached, is_gguf_ref

    base, lora = ref, None
    if "+" in ref and not Path(ref).exists():
        b, _, a = ref.rpartition("+")
        if b and a and (Path(b).exists() or is_gguf_ref(b)) and Path(a).exists():
            base, lora = b, a
    if is_gguf_ref(base):
        base = str(import_cached(base))
    return base, lora


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key``: the first pattern ``p`` with ``(.*\\.)?(p)$`` matching."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """A parsed and checked peft LoRA adapter directory (see module doc)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / ADAPTER_CONFIG
        if not self.path.is_dir():
            raise AdapterError(f"{self.path}: LoRA adapter directory does not exist")
        if not cfg_path.is_file():
            raise AdapterError(f"{cfg_path}: missing (a peft adapter directory has {ADAPTER_CONFIG} "
                               f"and {ADAPTER_WEIGHTS})")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{cfg_path}: not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise AdapterError(f"{cfg_path}: must hold a JSON object")
        self.config = cfg
        ptype = cfg.get("peft_type", "LORA")
        if str(ptype).upper() != "LORA":
            raise AdapterError(f"{cfg_path}: peft_type {ptype!r} is not supported (only LORA)")
        missing = [k for k in ("r", "lora_alpha", "target_modules") if cfg.get(k) in (None, [], "")]
        if missing:
            raise AdapterError(f"{cfg_path}: lacks {missing} (needed to apply a LoRA adapter)")
        for key, what in _REFUSED.items():
            if cfg.get(key) not in (None, False, [], {}, 0):
                raise AdapterError(f"{cfg_path}: {key}={cfg[key]!r}: {what} cannot be merged as "
                                   "W + scale·BA; not supported")
        if cfg.get("bias", "none") != "none":
            raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r}: trained biases are not supported")
        r, alpha = cfg["r"], cfg["lora_alpha"]
        if not (isinstance(r, int) and r > 0) or not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
            raise AdapterError(f"{cfg_path}: r={r!r} must be a positive integer and lora_alpha={alpha!r} a number")
        self.rslora = bool(cfg.get("use_rslora", False))
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            bins = sorted(p.name for p in self.path.glob("adapter_model.*"))
            hint = f" (found {bins}: only safetensors adapters are read, never pickles)" if bins else ""
            raise AdapterError(f"{weights}: missing{hint}")
        try:
            self.weights = Checkpoint(weights)
        except CheckpointError as e:
            raise AdapterError(str(e)) from None
        pairs: dict[str, dict[str, TensorInfo]] = {}
        for name, info in self.weights.tensors.items():
            m = _KEY_RE.match(name)
            if m is None or not name.startswith(_PREFIX):
                raise AdapterError(f"{weights}: tensor {name!r} is not a LoRA A/B weight "
                                   f"({_PREFIX}<module>.lora_A|lora_B.weight); not supported")
            if info.dtype not in ("F32", "F16", "BF16") or len(info.shape) != 2:
                raise AdapterError(f"{weights}: tensor {name!r} must be a 2-D float matrix, "
                                   f"is {info.dtype} {list(info.shape)}")
            pairs.setdefault(m.group("module")[len(_PREFIX):], {})[m.group("ab")] = info
        if not pairs:
            raise AdapterError(f"{weights}: holds no LoRA weights")
        self.modules: dict[str, tuple[TensorInfo, TensorInfo, float]] = {}
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{weights}: module {module!r} has lora_{''.join(ab)} without its pair")
            a, b = ab["A"], ab["B"]
            rank = a.shape[0]
            if b.shape[1] != rank:
                raise AdapterError(f"{weights}: module {module!r}: lora_A is {list(a.shape)}, lora_B "
                                   f"{list(b.shape)} (ranks differ)")
            rk = _pattern_value(cfg.get("rank_pattern") or {}, module, r)
            if rk != rank:
                raise AdapterError(f"{weights}: module {module!r} has rank {rank}, {ADAPTER_CONFIG} says {rk}")
            al = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha))
            scale = al / math.sqrt(rank) if self.rslora else al / rank
            self.modules[f"{module}.weight"] = (a, b, scale)

    def files(self) -> list[str]:
        return [str(self.path / ADAPTER_CONFIG), str(self.path / ADAPTER_WEIGHTS)]

    def check_base(self, base: Checkpoint) -> None:
        """Every adapted module exists in ``base`` with the shape ``B @ A`` gives."""
        for name, (a, b, _) in self.modules.items():
            t = base.tensors.get(name)
            if t is None:
                raise AdapterError(f"{self.path}: adapts {name!r}, which base {base.path} does not have "
                                   "(an adapter made for another model?)")
            want = (a.shape[1], b.shape[0]) if self.fan_in_fan_out else (b.shape[0], a.shape[1])
            if tuple(t.shape) != want:
                raise AdapterError(f"{self.path}: {name!r} is {list(t.shape)} in base {base.path}, "
                                   f"the adapter's B @ A is {list(want)} (an adapter made for another model?)")
            if t.dtype not in ("F32", "F16", "BF16"):
                raise AdapterError(f"{self.path}: base tensor {name!r} of {base.path} is {t.dtype}, not a float")

    def delta(self, name: str) -> torch.Tensor | None:
        """``scale · B @ A`` of tensor ``name`` in float32 (None when it is not adapted)."""
        entry = self.modules.get(name)
        if entry is None:
            return None
        a, b, scale = entry
        d = self.weights.read(b.name).float() @ self.weights.read(a.name).float()
        d = (d.T if self.fan_in_fan_out else d) * scale
        if b.dtype != "F32":  # peft rounds a half-precision adapter's product to its dtype
            d = d.to(DTYPES[b.dtype]).float()
        return d


class AdaptedCheckpoint(Checkpoint):
    """A base checkpoint with a LoRA adapter applied on read (see module doc)."""

    def __init__(self, base: str | Path, adapter: str | Path):
        super().__init__(base)
        self.adapter = LoraAdapter(adapter)
        self.adapter.check_base(self)

    def read(self, name: str, out: bytearray | None = None) -> torch.Tensor:
        x = super().read(name, out)
        d = self.adapter.delta(name)
        if d is None:
            return x
        return (x.float() + d).to(x.dtype)  # as peft's in-place `W += delta` rounds

    def read_rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows of the adapted tensor, the same values as ``read(name)[a:b]``: the adapter's
        delta of the tensor is formed whole once (kept while its rows are read) and sliced."""
        x = super().read_rows(name, a, b)
        if name not in self.adapter.modules:
            return x
        if getattr(self, "_delta_of", None) != name:
            self._delta = None  # the previous tensor's delta goes first
            self._delta, self._delta_of = self.adapter.delta(name), name
        if self._delta is None:
            return x
        return (x.float() + self._delta[a:b]).to(x.dtype)

    def source_files(self) -> list[str]:
        return super().source_files() + self.adapter.files()

    def digest(self) -> str:
        from lsm_dist.utils import sha256_json

        return sha256_json({"base": super().digest(), "adapter": self.adapter.config,
                            "lora": {n: [list(a.shape), list(b.shape), s]
                                     for n, (a, b, s) in self.adapter.modules.items()}})[:16]

    def __repr__(self) -> str:
        return f"AdaptedCheckpoint({str(self.path)!r} + {str(self.adapter.path)!r})"


def open_model(path: str | Path, lora: str | Path | None = None) -> Checkpoint:
    """The one way to open a model input: a checkpoint, or a base with a LoRA adapter."""
    return AdaptedCheckpoint(path, lora) if lora else Checkpoint(path)


def open_ref(ref: str | Path) -> Checkpoint:
    """``open_model`` of a path or a ``BASE+ADAPTER`` reference."""
    return open_model(*split_model_ref(str(ref)))


def resolve_ref(ref: str) -> str:
    """A path or ``BASE+ADAPTER`` reference with its parts made absolute."""
    base, lora = split_model_ref(ref)
    return str(Path(base).resolve()) + (f"+{Path(lora).resolve()}" if lora else "")

