"""The merge plan (contract 4): a YAML file → :class:`MergePlan` → :func:`resolve_plan`.

``resolve_plan`` does every check before heavy work: each model opens (headers only), every
tensor the plan selects exists in every model (layer-mapped for other depths), the VAE's
chunking fits each model, the method's parameters suit its inputs, a heterogeneous pair has an
alignment, and ``out_dir`` holds no other merge. It returns the :class:`ResolvedPlan` with one
:class:`TensorJob` per merged output tensor (``lsm_dist.merge.layout``: slices, ``rest``, and
each tensor's parameters resolved for its name and depth by ``lsm_dist.merge.settings``),
grouped by layer, and the plan digest that names this merge (the content digests of models and
VAEs and every job's resolved parameters included, so a changed model is a new merge).

A mergekit config (``merge_method`` at top level) is read onto the same plan by
``lsm_dist.merge.mergekit`` (:func:`load_plan`). An output vocabulary (``tokenizer``) is built here
too (``lsm_dist.merge.vocab``: tokenizer files only), its permutations checked against every
vocabulary tensor's inputs, and its digest enters the plan's. ``PLAN_VERSION`` enters the digest: bump it
when an operator's arithmetic changes, so finished merges are not reused.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsm_dist.adapters import open_model, split_model_ref
from lsm_dist.checkpoint import Checkpoint, TensorInfo, content_digest, identity_digest
from lsm_dist.chunking import ChunkSpec
from lsm_dist.config import (
    ConfigError,
    check,
    check_choice,
    config_data,
    doc,
    from_dict,
    read_yaml_mapping,
    to_dict,
)
from lsm_dist.merge.hetero import AlignConfig, resolve_layer_map
from lsm_dist.merge.layout import SAFETENSORS_DTYPES, TensorJob, build_layout, default_inputs
from lsm_dist.merge.operators import OPERATORS, MergeParams, get_operator
from lsm_dist.merge.settings import PER_INPUT, check_settings
from lsm_dist.merge.vocab import (
    TokenizerPlan,
    Vocabulary,
    build_vocabulary,
    has_tokenizer,
    resolve_chat_template,
)
from lsm_dist.model import VAEConfig, read_vae_config, vae_digest
from lsm_dist.utils import atomic_write_json, get_logger, read_json, sha256_json

log = get_logger("lsm.merge")
PLAN_RECORD = "merge_plan.json"
WORK_DIR = ".lsm_merge"  # layout mergekit: the record, layers/ and the log, inside the model directory
LAYOUTS = ("lsm", "mergekit")
SPACES = ("latent", "weight")
ENCODINGS = ("full", "delta")
DECODES = ("delta", "direct")
BLOCK_CHOICES = {"attn": ["attn"], "mlp": ["mlp"], "both": ["attn", "mlp"]}
LATENT_DTYPES = ("float32", "bfloat16")
RESTS = ("target", "weight")
PLAN_VERSION = 2
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str, field_name: str = "max_shard_size") -> int:
    """``2GB`` (10^9), ``500MiB`` (2^20) or a number of bytes → bytes."""
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
        check(m is not None and m.group(2).upper() in _UNITS, field_name,
              f"{value!r} is not a size such as 2GB, 500MB or 1048576")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    check(n > 0, field_name, f"must be positive, got {value!r}")
    return n


@dataclass
class ModelEntry:
    path: str = doc("HF checkpoint directory or .safetensors file; '${zoo_dir}' expands to zoo_dir")
    vae: str | None = doc("this model's own VAE checkpoint (default: the plan's `vae`)", None)
    lora: str | None = doc("peft LoRA adapter directory applied on `path` (the base), tensor by "
                           "tensor; mergekit's `path: BASE+ADAPTER` means the same", None)
    params: dict[str, Any] = doc("this model's per-input parameters (weight, density, gamma, epsilon): "
                                 "a value, a gradient [a, b, ...] or [{filter, value}, ...] "
                                 "(lsm_dist.merge.settings)", factory=dict)

    def __post_init__(self) -> None:
        check_settings(self.params, "models.<id>.params", list(PER_INPUT))


@dataclass
class SliceSource:
    model: str = doc("model id (a key of `models`)")
    layers: list[int] = doc("[start, end): the model's layers this slice takes (mergekit layer_range)")
    params: dict[str, Any] = doc("this source's per-input parameters (as models.<id>.params)", factory=dict)

    def __post_init__(self) -> None:
        check(len(self.layers) == 2 and 0 <= self.layers[0] < self.layers[1], "slices.sources.layers",
              f"must be [start, end) with 0 <= start < end, got {self.layers}")
        check_settings(self.params, "slices.sources.params", list(PER_INPUT))


@dataclass
class MergeSlice:
    sources: list[SliceSource] = doc("models merged into this run of output layers (same length each)")
    base: str | None = doc("base model of this slice (default: the plan's `base`)", None)
    params: dict[str, Any] = doc("parameter settings of this slice (as tensor_params)", factory=dict)

    def __post_init__(self) -> None:
        check(bool(self.sources), "slices.sources", "name at least one source")
        check_settings(self.params, "slices.params")


def _model_entry(mid: str, v) -> ModelEntry:
    if isinstance(v, ModelEntry):
        return v
    if isinstance(v, str):
        return ModelEntry(path=v)
    check(isinstance(v, dict), f"models.{mid}", f"must be a path or {{path, vae, lora}}, got {v!r}")
    return from_dict(ModelEntry, v, f"models.{mid}")


@dataclass
class MergePlan:
    models: dict[str, ModelEntry | str] = doc("model id → path (or {path, vae, params})", factory=dict)
    target: str | None = doc("model whose config, tokenizer, untouched tensors and decoder are "
                             "used (default: base, else the first model)", None)
    base: str | None = doc("base model of the task-vector methods (and model_stock; optional for "
                           "nuslerp / multislerp)", None)
    inputs: list[str] | None = doc("operator inputs, in order (default: target first, then the "
                                   "other models; methods with a base: every model but the base)", None)
    method: str = doc("merge operator: " + " | ".join(sorted(OPERATORS)), "lerp")
    params: MergeParams = doc("operator parameters for every tensor (lambda, weights, density, ...)",
                              factory=MergeParams)
    tensor_params: dict[str, Any] = doc(
        "parameters varying by tensor (filters) and depth (gradients) over `params`: key → a value, "
        "a gradient [a, b, ...] or [{filter: substring, value: ...}, ...] (lsm_dist.merge.settings)",
        factory=dict)
    slices: list[MergeSlice] | None = doc(
        "output layers as runs of source layers (mergekit slices; passthrough stacks models): "
        "[{sources: [{model, layers: [start, end)}], base, params}]; null = the target's layers", None)
    space: str = doc("latent (LS-Merge) or weight (the weight-space baselines)", "latent")
    decode: str = doc("latent space: delta (W = W_target + D(z_merged) - D(z_target): the VAE's "
                      "reconstruction error cancels, z_merged = z_target gives W_target exactly) | "
                      "direct (W = D(z_merged), the paper's)", "delta")
    encoding: str = doc("latent space: full (encode the weights) | delta (encode the task vectors "
                        "W - W_base, with a VAE trained on a delta corpus of that base, and decode onto "
                        "the base: lsm_dist.delta)", "full")
    blocks: str | list[str] = doc("tensors merged in `space`: attn | mlp | both", "both")
    rest: str = doc("tensors outside `blocks` (norms, embeddings, head, biases): target (copied from "
                    "the target) | weight (merged in weight space with the same method, as mergekit does)",
                    "target")
    include: str | None = doc("regex: merge only matching tensors (within blocks)", None)
    exclude: str | None = doc("regex: never merge matching tensors", None)
    layer_map: str | list[int] | dict[str, list[int]] = doc(
        "source layer per target layer for models of another depth: proportional | [i_s, ...] "
        "(for every other model) | {model: [i_s, ...]}", "proportional")
    alignment: AlignConfig | str = doc("OT alignment (none | gaussian | emd | sinkhorn, reg, "
                                       "max_samples); a string is the method", factory=AlignConfig)
    dtype: str | None = doc("weight space: round the inputs to this dtype before merging (mergekit "
                            "`dtype`; see `arithmetic`): float32 | bfloat16 | float16", None)
    arithmetic: str = doc("float32: every operator computes in float32 | dtype: with `dtype` set, the "
                          "task-vector methods, nuslerp, multislerp, karcher, model_stock and passthrough compute "
                          "in that dtype (mergekit's arithmetic; set when reading a mergekit config)", "float32")
    out_dtype: str | None = doc("dtype of the merged tensors (default: `dtype` if set, else the "
                                "target tensor's)", None)
    origin: str | None = doc("where the plan came from (e.g. the mergekit config read), for the model card", None)
    vae: str | None = doc("VAE checkpoint directory (latent space)", None)
    out_dir: str = doc("merge output: merge_plan.json, layers/, model/", "runs/merge/out")
    cache_dir: str = doc("latent cache root: <cache_dir>/<model_digest>-<vae_digest>/", "runs/latent_cache")
    zoo_dir: str = doc("expands '${zoo_dir}' in model and VAE paths", "runs/zoo")
    batch_size: int = doc("samples per VAE encode/decode batch (on a 2-core AVX2 CPU 512 ran 1.4-2x faster than 4096, "
                          "same values: benchmarks/README.md)", 512)
    device: str = doc("auto | cpu | cuda | cuda:N (bf16 autocast on CUDA)", "auto")
    latent_dtype: str = doc("stored latent dtype: float32 | bfloat16", "float32")
    max_padding_fraction: float = doc("fail when more than this fraction of a model's samples "
                                      "would be zero padding (VAE sample too large)", 0.5)
    max_shard_size: int | str = doc("assembled checkpoint shard size (bytes or 2GB / 500MB)", "2GB")
    overwrite: bool = doc("replace another merge already in out_dir", False)
    allow_download: bool = doc("models named by Hugging Face id (org/name[@revision]) may be downloaded "
                               "(safetensors, configs, tokenizers only) when not in the HF cache; off: "
                               "the cache only", False)
    keep_layers: bool | None = doc("keep layers/ (the per-layer merged tensors) once the checkpoint is "
                                   "assembled; false halves the disk a finished merge takes, and a weight-space "
                                   "merge in one process then writes no layer files at all: each tensor is "
                                   "merged as the checkpoint is written (None: true for a latent merge of "
                                   "layout lsm, false otherwise)", None)
    layout: str = doc("lsm: out_dir/{merge_plan.json, layers/, model/} | mergekit: the model is out_dir "
                      "itself, as mergekit-yaml CONFIG OUT leaves it (+ mergekit_config.yml), the record, "
                      "layer files and log in out_dir/.lsm_merge/", "lsm")
    copy_tokenizer: bool = doc("copy the target's tokenizer files into the merged model (mergekit's "
                               "--copy-tokenizer / --no-copy-tokenizer); with `tokenizer` set the built "
                               "tokenizer is written in any case", True)
    tokenizer: TokenizerPlan | None = doc(
        "the output vocabulary (mergekit's tokenizer_source / tokenizer:, lsm_dist.merge.vocab): {source: "
        "base | union | <model id>, tokens: {token: {source, force}}, pad_to_multiple_of}; the embeddings and "
        "head are permuted into it per input before merging (they must be merged in weight space: rest: "
        "weight), config.json's vocab_size follows it and its tokenizer is written; null: the target's "
        "vocabulary, every input's must match it", None)
    chat_template: str | None = doc("chat template of the merged model's tokenizer (mergekit's chat_template): "
                                    "auto (the one most models carry) | a mergekit built-in name (chatml, "
                                    "llama3, ...) | Jinja text", None)
    allow_crimes: bool = doc("merge models whose configs name different architectures although their "
                             "tensor shapes agree (mergekit's --allow-crimes); refused by default", False)

    def __post_init__(self) -> None:
        check(bool(self.models), "models", "name at least one model (id: path)")
        self.models = {k: _model_entry(k, v) for k, v in self.models.items()}
        for k in self.models:
            check(bool(k) and "/" not in k, "models", f"model id {k!r} must be a plain name")
        known = list(self.models)
        for name in ("target", "base"):
            v = getattr(self, name)
            check(v is None or v in self.models, name, f"{v!r} is not a model of this plan; known: {known}")
        if self.target is None:
            self.target = self.base or known[0]
        op = get_operator(self.method)
        check_choice(self.space, "space", SPACES)
        check_choice(self.decode, "decode", DECODES)
        check_choice(self.encoding, "encoding", ENCODINGS)
        check(self.encoding == "full" or self.base is not None, "encoding",
              "delta encoding encodes task vectors W - W_base: set `base`")
        check_choice(self.rest, "rest", RESTS)
        check_choice(self.arithmetic, "arithmetic", ("float32", "dtype"))
        if isinstance(self.blocks, str):
            check_choice(self.blocks, "blocks", list(BLOCK_CHOICES))
            self.blocks = BLOCK_CHOICES[self.blocks]
        check(bool(self.blocks), "blocks", "select attn, mlp or both")
        for b in self.blocks:
            check(b in ("attn", "mlp"), "blocks", f"{b!r} is not one of ['attn', 'mlp']")
        if isinstance(self.alignment, str):
            self.alignment = AlignConfig(method=self.alignment)
        check_settings(self.tensor_params, "tensor_params")
        for k, sl in enumerate(self.slices or []):
            for src in sl.sources:
                check(src.model in self.models, f"slices[{k}].sources.model",
                      f"{src.model!r} is not a model of this plan; known: {known}")
            check(sl.base is None or sl.base in self.models, f"slices[{k}].base",
                  f"{sl.base!r} is not a model of this plan; known: {known}")
        check(self.slices is None or bool(self.slices), "slices", "name at least one slice (or leave it null)")
        self.inputs_given = self.inputs is not None
        if self.inputs is None:
            self.inputs = default_inputs(op, known, self.target, self.base)
        for m in self.inputs:
            check(m in self.models, "inputs", f"{m!r} is not a model of this plan; known: {known}")
        check(len(set(self.inputs)) == len(self.inputs), "inputs", f"lists a model twice: {self.inputs}")
        if self.slices is None:
            op.validate(self.params, len(self.inputs), self.base is not None)
        for name in ("dtype", "out_dtype"):
            v = getattr(self, name)
            check(v is None or v in SAFETENSORS_DTYPES, name, f"{v!r} is not one of {list(SAFETENSORS_DTYPES)}")
        if self.space == "weight":
            check(not op.latent_only, "method", f"{self.method!r} needs posterior latents: use space: latent")
            check(not self.alignment.latent_ot, "alignment",
                  "OT alignment works on latents: use space: latent, or alignment: activations (which "
                  "transports the weights themselves)")
        else:
            missing = [m for m, e in self.models.items() if e.vae is None] if self.vae is None else []
            check(not missing, "vae", f"space: latent needs a VAE: set `vae` (or models.<id>.vae for {missing})")
        check_choice(self.latent_dtype, "latent_dtype", LATENT_DTYPES)
        check_choice(self.layout, "layout", LAYOUTS)
        if self.keep_layers is None:
            self.keep_layers = self.layout == "lsm" and self.space == "latent"
        check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        check(self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device) is not None,
              "device", f"{self.device!r} is not auto, cpu, cuda or cuda:N")
        check(0.0 <= self.max_padding_fraction < 1.0, "max_padding_fraction", "must be in [0, 1)")
        parse_size(self.max_shard_size)
        if isinstance(self.layer_map, dict):
            for m in self.layer_map:
                check(m in self.models, "layer_map", f"{m!r} is not a model of this plan; known: {known}")
        if self.tokenizer is not None:
            self.tokenizer.check_models(known)

    # ---- helpers ---------------------------------------------------------------------
    def expand(self, p: str) -> Path:
        return Path(p.replace("${zoo_dir}", self.zoo_dir)).expanduser()

    def model_path(self, mid: str) -> Path:
        return self.model_ref(mid)[0]

    def model_ref(self, mid: str) -> tuple[Path, Path | None]:
        """(checkpoint path, LoRA adapter dir or None) of model ``mid``; a Hugging Face id
        (``org/name[@revision]``) is its snapshot in the HF cache (``lsm_dist.hub``)."""
        e = self.models[mid]
        if e.lora:
            return self._hub(self.expand(e.path)), self.expand(e.lora)
        path, lora = split_model_ref(str(self.expand(e.path)))
        return self._hub(Path(path)), Path(lora) if lora else None

    def _hub(self, p: Path) -> Path:
        from lsm_dist.hub import is_hub_id, resolve_hub_id

        return resolve_hub_id(str(p), self.allow_download) if is_hub_id(str(p)) else p

    def vae_path(self, mid: str) -> Path | None:
        v = self.models[mid].vae or self.vae
        return self.expand(v) if v else None

    @property
    def operands(self) -> list[str]:
        """Models whose tensors are read: inputs, the base (if the method takes one, or with
        delta encoding), the target, and every model of the slices."""
        out = list(self.inputs)
        bases = {self.base} | {s.base for s in self.slices or []}
        for b in bases:
            takes = get_operator(self.method).takes_base(True) or self.encoding == "delta"
            if b is not None and takes and b not in out:  # delta encoding reads W_base
                out.append(b)
        for s in self.slices or []:
            out += [src.model for src in s.sources if src.model not in out]
        if self.target not in out:
            out.append(self.target)
        return out


def load_plan(path: str | Path | None = None, overrides=()) -> MergePlan:
    """Defaults ← YAML ← dotted overrides (``params.lambda=0.3`` works: key ``lambda``).

    A mergekit config (a file with ``merge_method``) is read onto the same plan by
    ``lsm_dist.merge.mergekit`` first; the overrides then apply to the plan it gives."""
    if path is not None:
        _refuse_multi_document(Path(path))
    data = read_yaml_mapping(path, "merge plan") if path is not None else {}
    if "merge_method" in data:
        from lsm_dist.merge.mergekit import plan_data

        data = plan_data(data, path)
    data = config_data(MergePlan, path, overrides, what="merge plan",
                       aliases={"params.lambda": "params.lambda_"}, data=data)
    return from_dict(MergePlan, data)


def _refuse_multi_document(path: Path) -> None:
    """A file of several YAML documents is mergekit-multi's format (named merges run in order,
    later ones reading earlier outputs): say so instead of a YAML parser error."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError):
        return  # read_yaml_mapping names the problem
    if len(docs) > 1:
        names = [d.get("name") for d in docs if isinstance(d, dict)]
        raise ConfigError(f"merge plan {path}: holds {len(docs)} YAML documents {names} -- a mergekit-multi file; "
                          "lsm merge runs one merge per file: split it into one config per document and run them "
                          "in order (a later one may name an earlier one's output directory as a model)")


def plan_to_dict(plan: MergePlan) -> dict:
    d = to_dict(plan)
    d["params"]["lambda"] = d["params"].pop("lambda_")
    return d


# ------------------------------------------------------------------------------ resolve
@dataclass
class ModelInfo:
    id: str
    path: Path
    vae: Path | None
    num_layers: int
    digest: str  # content digest (config + safetensors bytes)
    vae_digest: str | None
    vae_cfg: VAEConfig | None
    layer_map: list[int] | None  # target layer -> this model's layer (None: the target)
    lora: Path | None = None  # LoRA adapter applied on `path`

    def open(self) -> Checkpoint:
        return open_model(self.path, self.lora)


@dataclass
class ResolvedPlan:
    plan: MergePlan
    models: dict[str, ModelInfo]
    jobs: list[TensorJob]
    heterogeneous: bool
    digest: str
    outputs: list[TensorInfo] = field(default_factory=list)  # the merged checkpoint's tensors, in order
    config_patch: dict = field(default_factory=dict)  # config.json keys the output changes
    groups: dict[str, list[TensorJob]] = field(default_factory=dict)
    # alignment: activations: {"config": the plan's alignment, "models": per source, its report}
    # (the plan above names the transported checkpoints and alignment none)
    alignment_report: dict | None = None
    vocab: Vocabulary | None = None  # the output vocabulary (plan.tokenizer)
    chat_template: str | None = None  # the resolved chat template text (plan.chat_template)

    def __post_init__(self) -> None:
        for j in self.jobs:
            self.groups.setdefault(j.group, []).append(j)

    @property
    def out_dir(self) -> Path:
        return Path(self.plan.out_dir)

    @property
    def work_dir(self) -> Path:
        """The merge record, the layer files and the log: out_dir (layout lsm) or
        out_dir/.lsm_merge (layout mergekit, where out_dir is the model)."""
        return self.out_dir / WORK_DIR if self.plan.layout == "mergekit" else self.out_dir

    @property
    def layers_dir(self) -> Path:
        return self.work_dir / "layers"

    @property
    def model_dir(self) -> Path:
        return self.out_dir if self.plan.layout == "mergekit" else self.out_dir / "model"


def _shape_desc(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def resolve_plan(plan: MergePlan) -> ResolvedPlan:
    """All checks before heavy work (see module doc); raises ConfigError / ValueError."""
    check_out_dir(plan)
    checkpoints: dict[str, Checkpoint] = {}
    for mid in plan.operands:
        path, lora = plan.model_ref(mid)
        try:
            checkpoints[mid] = open_model(path, lora)
        except (ValueError, OSError) as e:
            what = f"{path} + LoRA {lora}" if lora else str(path)
            raise ConfigError(f"models.{mid}: cannot open {what}: {e}") from None
        bad = checkpoints[mid].weight_dtype_problems()
        if bad:
            raise ConfigError(f"models.{mid}: {path}: {bad[0]}")
    tid = plan.target
    tck = checkpoints[tid]
    if plan.rest == "target" and plan.slices is None:  # else every tensor is merged anyway
        check(bool(tck.select(plan.blocks, plan.include, plan.exclude)), "blocks",
              f"no {plan.blocks} tensors of target {tid} match include={plan.include!r} exclude={plan.exclude!r}")
    maps: dict[str, list[int] | None] = {}
    for mid, ck in checkpoints.items():
        if mid == tid or plan.slices is not None:
            maps[mid] = None
            continue
        spec = plan.layer_map.get(mid, "proportional") if isinstance(plan.layer_map, dict) else plan.layer_map
        maps[mid] = resolve_layer_map(spec, tck.num_layers, ck.num_layers, mid)
    vocab = build_vocabulary(plan, checkpoints) if plan.tokenizer is not None else None
    template = resolve_chat_template(plan)
    if plan.chat_template and vocab is None and plan.copy_tokenizer:
        check(has_tokenizer(plan.model_path(tid)), "chat_template",
              f"the target {tid} has no tokenizer to set the chat template in ({plan.model_path(tid)})")
    jobs, outputs, patch = build_layout(plan, checkpoints, maps, vocab)
    hetero_why = None
    for j in jobs:
        ref = j.shape
        for mid, name in j.sources.items():
            shape = checkpoints[mid].tensors[name].shape
            if shape == ref or (j.vocab is not None and shape[1:] == ref[1:]):  # rows: permuted into the vocab
                continue
            why = f"{name} is {_shape_desc(shape)} in {mid}, {_shape_desc(ref)} in the output"
            check(j.space == "latent", "space" if plan.space == "weight" else "rest",
                  f"heterogeneous models ({why}): weight-space merges need identical shapes; "
                  + ("use alignment: activations (functional alignment), or space: latent with an OT "
                     "alignment" if plan.space == "weight" else
                     "tensors outside `blocks` are merged in weight space (rest: weight); use rest: target"))
            hetero_why = hetero_why or why
        if j.space == "latent":
            check(tid in j.sources, "slices", f"latent-space merging decodes with the target's VAE and "
                  f"statistics: every slice needs the target {tid} among its sources ({j.name} has "
                  f"{sorted(j.sources)}); use space: weight")
    if plan.slices is None:
        for mid, ck in checkpoints.items():
            if ck.num_layers != tck.num_layers and hetero_why is None:
                hetero_why = f"{mid} has {ck.num_layers} layers, {tid} has {tck.num_layers}"
    if hetero_why is None and not plan.alignment.latent_ot and not plan.allow_crimes:
        archs = {mid: _architecture(ck) for mid, ck in checkpoints.items()}
        odd = {m: a for m, a in archs.items() if a != archs[tid] and a is not None and archs[tid] is not None}
        check(not odd, "models",
              f"{', '.join(f'{m} is {a}' for m, a in odd.items())} but the target {tid} is {archs[tid]}: the shapes "
              "agree, the architectures do not (the merge would mix weights that mean different things); set "
              "allow_crimes: true if that is what you want")
    if hetero_why is not None:
        check(plan.encoding == "full", "encoding",
              f"heterogeneous models ({hetero_why}): delta encoding encodes task vectors W − W_base, which "
              f"need every model in the base's shapes; carry another family's task vector with "
              "alignment: {method: activations, source_base: <its base>} instead")
        check(plan.space == "latent", "space",
              f"heterogeneous models ({hetero_why}): weight-space merges need identical shapes; "
              "use alignment: activations (functional alignment), or space: latent with an OT alignment")
        check(plan.alignment.latent_ot, "alignment",
              f"heterogeneous models ({hetero_why}) need an OT alignment: set `alignment: gaussian` "
              "(or emd / sinkhorn), or `alignment: activations` (functional alignment)")
        if get_operator(plan.method).needs_logvar:
            check(plan.inputs == [tid], "inputs", "self_merge of a heterogeneous model: use the target")
    for mid, m in maps.items():
        dropped = dropped_layers(m, checkpoints[mid].num_layers)
        if dropped:
            log.warning("layer map: %d of the %d layers of %s are read by no layer of the target %s: %s",
                        len(dropped), checkpoints[mid].num_layers, mid, tid, dropped)
    infos = _model_infos(plan, checkpoints, maps, jobs)
    check_untouched_finite(plan, tck, {j.name for j in jobs}, infos[tid].digest)
    digest = sha256_json({
        "version": PLAN_VERSION,
        "plan": {k: v for k, v in plan_to_dict(plan).items()
                 if k not in ("models", "vae", "out_dir", "cache_dir", "zoo_dir", "batch_size",
                              "device", "overwrite", "origin", "allow_crimes", "keep_layers",
                              "allow_download", "layout")
                 and not (k in ("tokenizer", "chat_template") and v is None)},
        "models": {m: [i.digest, i.vae_digest] for m, i in infos.items()},
        "jobs": sha256_json([j.record() for j in jobs]),
        "config": patch,
        **({"vocab": vocab.digest()} if vocab is not None else {}),
        **({"chat_template": template} if template is not None else {}),
    })[:16]
    for ck in checkpoints.values():
        ck.close()
    return ResolvedPlan(plan, infos, jobs, hetero_why is not None, digest, outputs, patch,
                        vocab=vocab, chat_template=template)


def _architecture(ck: Checkpoint) -> str | None:
    """The architecture a checkpoint's config names (``architectures[0]``, else ``model_type``)."""
    cfg = getattr(ck, "config", None) or {}
    archs = cfg.get("architectures")
    return str(archs[0]) if isinstance(archs, list) and archs else (cfg.get("model_type") or None)


def dropped_layers(layer_map: list[int] | None, num_layers: int) -> list[int]:
    """The layers of a model that no target layer reads under ``layer_map``."""
    return [] if layer_map is None else sorted(set(range(num_layers)) - set(layer_map))


def _model_infos(plan, checkpoints, maps, jobs) -> dict[str, ModelInfo]:
    infos: dict[str, ModelInfo] = {}
    latent_dims = {}
    for mid, ck in checkpoints.items():
        vpath = plan.vae_path(mid) if plan.space == "latent" else None
        vcfg = vdig = None
        if vpath is not None:
            try:
                vcfg = read_vae_config(vpath)
                vdig = vae_digest(vpath)
            except ValueError as e:
                raise ConfigError(f"vae ({mid}): {e}") from None
            names = dict.fromkeys(j.sources[mid] for j in jobs if j.space == "latent" and mid in j.sources)
            if names:
                _check_fit(plan, mid, ck, vpath, vcfg, [ck.tensors[n] for n in names])
                latent_dims[mid] = vcfg.latent_dim
            else:  # this model's tensors are only merged in weight space
                vpath = vcfg = vdig = None
        # weight space: the files' identity (no read of the weights: hashing a 7B pair alone takes
        # longer than merging it); latent space: the content, which keys the shared latent cache
        digest = content_digest(ck, memo_dir(plan)) if plan.space == "latent" else identity_digest(ck)
        infos[mid] = ModelInfo(mid, ck.path, vpath, ck.num_layers, digest,
                               vdig, vcfg, maps[mid], plan.model_ref(mid)[1])
    if len(set(latent_dims.values())) > 1:
        raise ConfigError(f"vae: the models' VAEs have different latent_dim {latent_dims}; "
                          "latents can only be merged within one latent width")
    if plan.space == "latent":
        _check_encoding(plan, infos)
    return infos


def _check_encoding(plan: MergePlan, infos: dict[str, ModelInfo]) -> None:
    """A delta VAE only with ``encoding: delta`` of the base it was trained against, and back."""
    for mid, info in infos.items():
        if info.vae_cfg is None:
            continue
        d = info.vae_cfg.delta
        if plan.encoding == "full":
            check(d is None, "encoding", f"the VAE {info.vae} of {mid} codes task vectors of base "
                  f"{d and d.get('base')} (trained on a delta corpus): set encoding: delta and base")
            continue
        base = infos[plan.base]
        check(d is not None, "encoding", f"encoding: delta needs a VAE trained on a delta corpus; {info.vae} "
              f"(of {mid}) codes full weights")
        check(d["base_digest"] == base.digest, "base",
              f"the delta VAE {info.vae} was trained on task vectors of base {d.get('base')} (content digest "
              f"{d['base_digest']}), the plan's base {plan.base} is {base.path} ({base.digest})")


def _check_fit(plan: MergePlan, mid: str, ck: Checkpoint, vpath: Path, vcfg: VAEConfig, tensors) -> None:
    spec = ChunkSpec(vcfg.tokens, vcfg.chunk)
    total = sum(spec.num_samples(t.numel) for t in tensors) * spec.sample_size
    pad = sum(spec.padding(t.numel) for t in tensors)
    if total and pad / total > plan.max_padding_fraction:
        smallest = min(t.numel for t in tensors)
        raise ConfigError(
            f"vae: VAE {vpath} (samples of tokens×chunk = {vcfg.tokens}×{vcfg.chunk} = "
            f"{spec.sample_size} values) does not fit model {mid} ({ck.path}): {pad / total:.0%} of "
            f"its samples would be zero padding (max_padding_fraction={plan.max_padding_fraction}); "
            f"its smallest merged tensor has {smallest} values — use a VAE with smaller samples")
    if vcfg.cond != "none" and ck.num_layers > vcfg.max_layers:
        raise ConfigError(f"vae: VAE {vpath} knows layers 0..{vcfg.max_layers - 1} (cond), model "
                          f"{mid} has {ck.num_layers}")


def write_plan_record(rp: ResolvedPlan) -> None:
    """Claim ``out_dir`` for this merge: refuse one holding another merge unless overwrite, and
    one whose layers/ or model/ hold anything lsm merge did not write (never deleted)."""
    from lsm_dist.merge.assemble import foreign_outputs, remove_own_outputs

    for p in foreign_outputs(rp.layers_dir, rp.model_dir):
        raise ConfigError(f"out_dir: {p} was not written by lsm merge (a model/ without "
                          "MERGE_COMPLETE.json, or a layers/ entry without lsm merge metadata) and "
                          "would be overwritten: move it away or choose another out_dir")
    rec = rp.work_dir / PLAN_RECORD
    if rec.is_file():
        try:
            old = read_json(rec).get("digest")
        except ValueError:
            old = None
        if old != rp.digest:
            check(rp.plan.overwrite, "out_dir",
                  f"{rp.out_dir} holds another merge (plan digest {old}, this plan {rp.digest}); "
                  "choose another out_dir or set overwrite: true")
            remove_own_outputs(rp.layers_dir, rp.model_dir)
    atomic_write_json(rec, {
        "digest": rp.digest,
        "heterogeneous": rp.heterogeneous,
        "plan": plan_to_dict(rp.plan),
        "models": {m: {**{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(i).items()
                          if k != "vae_cfg"}} for m, i in rp.models.items()},
        "tensors": len(rp.jobs),
        "groups": list(rp.groups),
        **({"alignment_report": rp.alignment_report} if rp.alignment_report else {}),
    })


def _real(p: Path, field_name: str) -> Path:
    if p.is_symlink() and not p.exists():
        raise ConfigError(f"{field_name}: {p} is a dangling symbolic link or a symlink loop")
    return Path(os.path.realpath(p))


def check_out_dir(plan: MergePlan) -> None:
    """``out_dir`` apart from every input: not equal to, inside, or holding a model, LoRA
    adapter or VAE path (the merge writes and replaces ``out_dir/layers`` and ``out_dir/model``)."""
    out = _real(Path(plan.out_dir), "out_dir")
    for mid in plan.models:
        path, lora = plan.model_ref(mid)
        for what, p in ((f"models.{mid}", path), (f"LoRA adapter of {mid}", lora),
                        (f"vae of {mid}", plan.vae_path(mid))):
            if p is None:
                continue
            src = _real(p, what)
            rel = ("is" if src == out else "is inside" if src in out.parents
                   else "holds" if out in src.parents else None)  # fmt: skip
            check(rel is None, "out_dir",
                  f"{plan.out_dir} {rel} the input {what} ({p}): the merge writes into out_dir, so "
                  "it must be apart from every model and VAE; choose another out_dir")  # fmt: skip


def memo_dir(plan: MergePlan) -> Path:
    """Where a merge memoizes file digests and finiteness checks: the latent cache in latent
    space; in weight space (no cache of its own) ``out_dir/.lsm_memo``, so a weight-space merge
    writes nothing outside its out_dir."""
    if plan.space == "latent":
        return Path(plan.cache_dir)
    return Path(plan.out_dir) / (WORK_DIR if plan.layout == "mergekit" else "") / ".lsm_memo"


def check_untouched_finite(plan: MergePlan, tck: Checkpoint, merged: set[str], digest: str) -> None:
    """The target tensors copied unchanged into the merge hold no NaN/Inf (named with their
    file now, not at assembly). Memoized per target content digest (``memo_dir``)."""
    names = sorted(n for n in tck.tensors if n not in merged)
    key = sha256_json([digest, names])[:16]
    memo = memo_dir(plan) / "finite.json"
    try:
        done = read_json(memo) if memo.is_file() else {}
    except ValueError:
        done = {}
    if done.get(key):
        return
    try:
        tck.check_finite(names)
    except ValueError as e:
        raise ConfigError(f"models.{plan.target}: {e}; the tensor is not merged, so it would be copied "
                          "unchanged into the merged checkpoint: repair the target (or merge it: "
                          "blocks / include)") from None  # fmt: skip
    atomic_write_json(memo, {**done, key: True})
