"""The output layout of a merge: which tensors the merged checkpoint holds, where each comes
from, and how each is made (one :class:`TensorJob` per tensor that is not a plain copy of the
target's).

- Without ``slices`` the output has the target's tensors and layers; layer ``i`` of another
  model is the layer-mapped one (``layer_map``). With ``slices`` (mergekit's layer stacking)
  output layer ``o`` is the ``i``-th layer of one slice, taken from each of its sources at
  ``start + i``; the names are the first source's (the target's when it is a source) with the
  layer index renumbered; embeddings are merged over the first slice's models and the final
  norm / head over the last slice's, as mergekit does.
- Each tensor is merged in ``space`` (``blocks`` / ``include`` / ``exclude`` select it), merged
  in weight space (``rest: weight``), copied from the target (``rest: target``; with slices, from
  the slice's target source or first source: a ``copy`` job), and its parameters are resolved for
  its name and depth (``lsm_dist.merge.settings``; ``t = i / (n - 1)`` within its slice).
- With an output vocabulary (``plan.tokenizer``, ``lsm_dist.merge.vocab``) the embeddings and head
  (axis 0 the vocabulary) have its rows; their job names the inputs in mergekit's order and the
  base whose rows fill the tokens an input lacks, and each input is permuted before the merge.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from lsm_dist.checkpoint import FLOAT_DTYPES, LAYER_RE, Checkpoint, TensorInfo, UnknownTensorError
from lsm_dist.config import ConfigError, check
from lsm_dist.merge.operators import MergeParams, get_operator
from lsm_dist.merge.vocab import VOCAB_ROLES

EMBED_ROLES = ("embed", "pos_embed")  # global tensors merged with the first slice's models
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass
class TensorJob:
    name: str  # output tensor name
    group: str  # layers/<group>.safetensors
    layer: int | None  # output layer
    block: str | None
    role: str | None
    shape: tuple[int, ...]
    dtype: str  # output dtype (safetensors name)
    sources: dict[str, str]  # model id -> tensor name in that model
    space: str = "weight"  # latent | weight | copy
    inputs: list[str] = dataclasses.field(default_factory=list)  # operator inputs (copy: the source)
    base: str | None = None
    params: MergeParams | None = None
    # a tensor with a vocabulary axis (0) under an output vocabulary: the models permuted into it,
    # in mergekit's order (the averaging order of a token's default row), and the base whose row a
    # token some input lacks takes (mergekit's, also for methods without a base)
    vocab: list[str] | None = None
    vocab_base: str | None = None

    def record(self) -> list:
        """What identifies the job's result (enters the plan digest)."""
        p = None if self.params is None else dataclasses.asdict(self.params)
        rec = [self.name, self.space, self.dtype, self.sources, self.inputs, self.base, p]
        return rec + [self.vocab, self.vocab_base] if self.vocab is not None else rec


@dataclass
class LayerSpec:
    """One output layer (or the pre / post global tensors): its sources and parameters."""

    out: int | None
    src: dict[str, int | None]  # model -> source layer
    t: float
    inputs: list[str]
    base: str | None
    slice_params: dict
    source_params: dict[str, dict]
    template: str  # the model whose tensor names / shapes the output takes
    vocab_base: str | None = None  # the slice's (else the plan's) base, whatever the method


def t_of(i: int, n: int) -> float:
    return i / (n - 1) if n > 1 else 1.0


def renumber(name: str, layer: int) -> str:
    m = LAYER_RE.search(name)
    return name if m is None else f"{name[:m.start(1)]}{layer}{name[m.end(1):]}"


def default_inputs(op, models: list[str], target: str, base: str | None) -> list[str]:
    """Operator inputs when a plan (or slice) does not name them."""
    if op.needs_base or (op.base == "optional" and base is not None):
        return [m for m in models if m != base]
    if op.max_inputs == 1:
        return [target if target in models else models[0]]
    first = [target] if target in models else []
    return first + [m for m in models if m not in (target, base)]


def layer_specs(plan, checkpoints: dict[str, Checkpoint], maps: dict[str, list[int] | None]):
    """(per-layer specs, pre spec, post spec) of a plan."""
    op = get_operator(plan.method)
    tid = plan.target
    if plan.slices is None:
        n = checkpoints[tid].num_layers
        models = list(checkpoints)
        base = plan.base if op.takes_base(plan.base is not None) else None

        def spec(i: int | None, t: float) -> LayerSpec:
            src = {m: (i if (m == tid or i is None) else maps[m][i]) for m in models}
            return LayerSpec(i, src, t, list(plan.inputs), base, {}, {}, tid, plan.base)

        return [spec(i, t_of(i, n)) for i in range(n)], spec(None, 0.0), spec(None, 0.0)
    specs = []
    for k, sl in enumerate(plan.slices):
        models = [s.model for s in sl.sources]
        check(len(set(models)) == len(models), f"slices[{k}].sources", f"lists a model twice: {models}")
        lengths = {s.model: s.layers[1] - s.layers[0] for s in sl.sources}
        check(len(set(lengths.values())) == 1, f"slices[{k}].sources",
              f"every source must take the same number of layers, got {lengths}")
        for s in sl.sources:
            nl = checkpoints[s.model].num_layers
            check(s.layers[1] <= nl, f"slices[{k}].sources.layers",
                  f"{s.layers} is outside the {nl} layers of {s.model}")
        base = vocab_base = sl.base or plan.base
        if not op.takes_base(base is not None):
            base = None
        if base is not None:
            check(base in models, f"slices[{k}].base",
                  f"base {base!r} is not a source of this slice ({models})")
        inputs = [m for m in plan.inputs if m in models and m != base] if plan.inputs_given else []
        inputs = inputs or default_inputs(op, models, tid, base)
        params = sl.params
        src_params = {s.model: s.params for s in sl.sources}
        template = tid if tid in models else models[0]
        L = next(iter(lengths.values()))
        for i in range(L):
            src = {s.model: s.layers[0] + i for s in sl.sources}
            specs.append(LayerSpec(len(specs), src, t_of(i, L), inputs, base, params, src_params, template,
                                   vocab_base))
    first, last = specs[0], specs[-1]
    pre = dataclasses.replace(first, out=None, src=dict.fromkeys(first.src), t=0.0)
    post = dataclasses.replace(last, out=None, src=dict.fromkeys(last.src), t=0.0)
    return specs, pre, post


def _key(name: str, layer: int | None) -> tuple[int | None, str]:
    m = LAYER_RE.search(name)
    return (layer, m.group(2)) if m and layer is not None else (None, name)


def build_layout(plan, checkpoints: dict[str, Checkpoint], maps: dict[str, list[int] | None], vocab=None):
    """(jobs, outputs, config_patch) of a plan (``vocab``: its output vocabulary, a
    ``merge.vocab.Vocabulary``); every check names the tensor and model."""
    tid = plan.target
    specs, pre, post = layer_specs(plan, checkpoints, maps)
    index = {m: {_key(t.name, t.layer): t for t in ck.tensors.values()} for m, ck in checkpoints.items()}
    selected: dict[str, set[str]] = {}
    out_dtype = SAFETENSORS_DTYPES.get(plan.out_dtype or plan.dtype or "")
    promotes = plan.arithmetic == "dtype" and get_operator(plan.method).promotes

    def is_selected(m: str, name: str) -> bool:
        if m not in selected:
            ck = checkpoints[m]
            try:
                sel = ck.select(plan.blocks, plan.include, plan.exclude)
            except UnknownTensorError:
                if plan.rest != "weight":
                    raise
                sel = ck.select(plan.blocks, plan.include, plan.exclude, strict=False)  # rest: merged anyway
            selected[m] = {t.name for t in sel}
        return name in selected[m]

    jobs, outputs = [], []
    for spec, t, out_name in _walk(plan, checkpoints, specs, pre, post):
        floating = t.dtype in FLOAT_DTYPES
        in_vocab = vocab is not None and t.layer is None and t.role in VOCAB_ROLES
        if floating and is_selected(spec.template, t.name):
            space = plan.space
        elif floating and plan.rest == "weight":
            space = "weight"
        elif plan.slices is None:
            check(not in_vocab, "tokenizer", f"{t.name} has a vocabulary axis but would be copied from the "
                  "target unchanged: an output vocabulary needs the embeddings and head merged (rest: weight)")
            outputs.append(t)  # copied from the target by name at assembly
            continue
        else:
            space = "copy"
        check(not in_vocab or space == "weight", "tokenizer", f"{t.name} has a vocabulary axis: under an output "
              f"vocabulary it must be merged in weight space (rest: weight), not {space}")
        dtype = out_dtype if (out_dtype and floating and space != "copy") else t.dtype
        if promotes and floating and space == "weight" and plan.out_dtype is None:
            dtype = "F32"  # mergekit writes such a method's float32 result as it is
        group = f"layer-{spec.out:04d}" if spec.out is not None else "global"
        job = TensorJob(out_name, group, spec.out, t.block, t.role, t.shape, dtype, {}, space)
        if space == "copy":
            job.inputs = [spec.template]
        else:
            job.inputs, job.base = list(spec.inputs), spec.base
        delta_base = plan.base if space == "latent" and plan.encoding == "delta" else None  # reads W_base
        need = dict.fromkeys([*job.inputs, job.base, tid if space == "latent" else None, spec.template,
                              delta_base])
        job.sources = {m: _source(index, checkpoints, m, spec, t, out_name) for m in need
                       if m is not None and m in spec.src}
        if space != "copy":
            job.params = _params(plan, spec, job)
        if in_vocab:
            _vocab_job(plan, checkpoints, spec, job, vocab)
        outputs.append(TensorInfo(out_name, "", dtype, job.shape, spec.out, t.block, t.role, t.param))
        jobs.append(job)
    dup = sorted(n for n, c in Counter(o.name for o in outputs).items() if c > 1)
    check(not dup, "slices", f"output tensor names repeat: {dup[:3]}")
    return jobs, outputs, _config_patch(plan, checkpoints, specs, out_dtype, vocab)


def _vocab_job(plan, checkpoints, spec: LayerSpec, job: TensorJob, vocab) -> None:
    """A tensor with a vocabulary axis: the output vocabulary's rows, its inputs in mergekit's order
    (the slice's sources; the models as listed), every default row checked now."""
    order = list(spec.src) if plan.slices is not None else list(plan.models)
    operands = {*job.inputs, job.base}
    job.vocab = [m for m in order if m in operands]
    job.vocab_base = spec.vocab_base
    for m in job.vocab:
        info = checkpoints[m].tensors[job.sources[m]]
        need = max(vocab.perms[m]) + 1
        check(info.shape[0] >= need, f"models.{m}", f"{info.name} has {info.shape[0]} rows, its tokenizer and "
              f"config.json name {need}: is axis 0 its vocabulary?")
    vocab.defaults(job.vocab, job.vocab_base, job.name)  # raises where mergekit would fail mid-merge
    job.shape = (vocab.size, *job.shape[1:])


def _source(index, checkpoints, m: str, spec: LayerSpec, t: TensorInfo, out_name: str) -> str:
    """Model ``m``'s tensor paired with template tensor ``t`` (same suffix, its source layer)."""
    suffix = _key(t.name, t.layer)[1]
    layer = spec.src[m]
    src = index[m].get((layer, suffix) if t.layer is not None else (None, t.name))
    if src is None:
        want = f"layer {layer} '{suffix}'" if t.layer is not None else repr(t.name)
        raise ConfigError(f"models.{m}: has no tensor {want} (paired with output tensor "
                          f"{out_name!r}) in {checkpoints[m].path}")
    return src.name


def _walk(plan, checkpoints, specs, pre, post):
    """(spec, template tensor, output name) in output order."""
    if plan.slices is None:
        tck = checkpoints[plan.target]
        for t in tck.tensors.values():
            spec = specs[t.layer] if t.layer is not None else (pre if t.role in EMBED_ROLES else post)
            yield spec, t, t.name
        return
    first = checkpoints[pre.template]
    for t in first.tensors.values():
        if t.layer is None and t.role in EMBED_ROLES:
            yield pre, t, t.name
    for spec in specs:
        ck = checkpoints[spec.template]
        for t in ck.tensors.values():
            if t.layer == spec.src[spec.template]:
                yield spec, t, renumber(t.name, spec.out)
    last = checkpoints[post.template]
    for t in last.tensors.values():
        if t.layer is None and t.role not in EMBED_ROLES:
            yield post, t, t.name


def _params(plan, spec: LayerSpec, job: TensorJob) -> MergeParams:
    from lsm_dist.merge.settings import resolve_params

    shared = [spec.slice_params, plan.tensor_params]
    per_model = {m: [spec.source_params.get(m), plan.models[m].params, *shared] for m in job.inputs}
    p = resolve_params(plan.params, plan.inputs, job.inputs, shared, per_model, job.name,
                       job.sources, spec.t)
    try:
        get_operator(plan.method).validate(p, len(job.inputs), job.base is not None)
    except ConfigError as e:
        raise ConfigError(f"{e} (tensor {job.name}, inputs {job.inputs})") from None
    return p


def _config_patch(plan, checkpoints, specs, out_dtype, vocab=None) -> dict:
    patch: dict = {}
    tcfg = checkpoints[plan.target].config or {}
    if vocab is not None:
        check("vocab_size" in tcfg, "tokenizer", f"the target {plan.target}'s config.json has no top-level "
              "vocab_size to set to the output vocabulary's size")
        patch["vocab_size"] = vocab.size
    if plan.slices is not None:
        patch["num_hidden_layers"] = len(specs)
        if isinstance(tcfg.get("layer_types"), list):
            types = []
            for s in specs:
                lt = (checkpoints[s.template].config or {}).get("layer_types") or []
                types.append(lt[s.src[s.template]] if s.src[s.template] < len(lt) else "full_attention")
            patch["layer_types"] = types
    if out_dtype:
        name = next(k for k, v in SAFETENSORS_DTYPES.items() if v == out_dtype)
        keys = [k for k in ("dtype", "torch_dtype") if k in tcfg] or ["dtype"]
        patch |= dict.fromkeys(keys, name)
    return patch
