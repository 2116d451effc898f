"""Read a mergekit merge config (``mergekit-yaml`` format, mergekit 0.1.5) onto the project's
merge plan: :func:`plan_data` returns the same mapping a plan YAML holds, which
``load_plan`` validates like any other (one loader, one merge path).

What maps where (details and the semantic choices in docs/mergekit.md):

- ``merge_method`` → ``method`` (linear, slerp, nuslerp, multislerp, karcher, model_stock,
  passthrough, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
  della, della_linear, sce, ram, ramplus_tl, nearswap, arcee_fusion); ``base_model`` → ``base`` (and ``target``: its config and tokenizer);
- ``models: [{model, parameters}]`` → ``models.<id>`` with per-input ``params`` (weight,
  density, gamma, epsilon); ``slices: [{sources: [{model, layer_range, parameters}],
  base_model, parameters}]`` → ``slices``; top-level ``parameters`` → ``tensor_params``.
  Values keep mergekit's forms (scalars, gradients, ``filter`` lists); names are translated
  (``t`` → ``lambda``, ``lambda`` → ``scale``, ``rescale: true`` → ``rescale: l1``, ...);
- ``dtype`` / ``out_dtype`` as is; every tensor is merged (``rest: weight``), as mergekit does;
- ``tokenizer_source: union | base | <model>`` and ``tokenizer: {source, tokens: {tok: {source,
  force}}, pad_to_multiple_of}`` → ``tokenizer`` (``source: union | base | model`` + ``model: <id>``;
  token sources name model ids): the output vocabulary, into which every input's embeddings and
  head are permuted before the merge (``lsm_dist.merge.vocab``, mergekit 0.1.5's rules);
  ``chat_template`` (auto, a built-in name, Jinja text) → ``chat_template``. A source naming no
  model of the config is refused here, before any model is opened;
- mergekit's semantics where the project's defaults differ: TIES-style sign ties go to +
  (``sign_tie: positive``), random drops rescale to the L1 norm (``rescale: l1``), ``density``
  defaults to 1;
- ``space: latent`` is the one key mergekit does not have (default: ``weight``); run settings
  (``vae``, ``out_dir``, ...) may be given in the file or as overrides.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lsm_dist.config import check
from lsm_dist.merge.layout import SAFETENSORS_DTYPES
from lsm_dist.merge.settings import check_setting

# project method: (mergekit parameters -> project setting key, per-input keys, required keys)
GTA = {"weight": "weight", "density": "density", "normalize": "normalize", "rescale": "rescale",
       "lambda": "scale", "int8_mask": None}
METHODS: dict[str, dict[str, str | None]] = {
    "linear": {"weight": "weight", "normalize": "normalize", "int8_mask": None},
    "slerp": {"t": "lambda", "int8_mask": None},
    "nuslerp": {"weight": "weight", "nuslerp_flatten": "granularity", "nuslerp_row_wise": "granularity"},
    "multislerp": {"weight": "weight", "normalize_weights": "normalize", "eps": None},
    "karcher": {"max_iter": "max_iter", "tol": "tol"},
    "model_stock": {"filter_wise": "granularity"},
    "passthrough": {"scale": "scale"},
    "task_arithmetic": GTA,
    "ties": GTA,
    "dare_ties": GTA,
    "dare_linear": GTA,
    "breadcrumbs": GTA | {"gamma": "gamma"},
    "breadcrumbs_ties": GTA | {"gamma": "gamma"},
    "della": GTA | {"epsilon": "epsilon"},
    "della_linear": GTA | {"epsilon": "epsilon"},
    "sce": {"select_topk": "select_topk", "int8_mask": None},
    "ram": {"epsilon": "ram_epsilon"},
    "ramplus_tl": {"r": "ram_r", "alpha": "ram_alpha", "epsilon": "ram_epsilon"},
    "nearswap": {"t": "nearswap_t"},
    "arcee_fusion": {},
}
REQUIRED = {"linear": ["weight"], "slerp": ["t"], "nuslerp": ["weight"], "multislerp": ["weight"],
            "task_arithmetic": ["weight"], "ties": ["weight"], "dare_ties": ["weight"],
            "dare_linear": ["weight"], "breadcrumbs": ["weight"], "breadcrumbs_ties": ["weight"],
            "della": ["weight"], "della_linear": ["weight"], "nearswap": ["t"]}
# mergekit's defaults where the project's differ (rescale: the random methods rescale by default)
DEFAULTS = {"density": 1.0, "sign_tie": "positive", "scale": 1.0, "tie_break": "argsort"}
RESCALE_DEFAULT = {"dare_ties": "l1", "dare_linear": "l1", "della": "l1", "della_linear": "l1"}
PER_INPUT = ("weight", "density", "gamma", "epsilon")
MERGEKIT_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template", "modules", "name")
IGNORED_KEYS = ("name",)  # accepted, no effect on the merge (a mergekit-multi leftover): listed in the card
RUN_KEYS = ("space", "vae", "out_dir", "cache_dir", "zoo_dir", "device", "batch_size", "latent_dtype",
            "max_shard_size", "overwrite", "alignment", "blocks", "max_padding_fraction", "allow_download",
            "allow_crimes", "keep_layers")
DTYPES = tuple(SAFETENSORS_DTYPES)


def plan_data(raw: Mapping[str, Any], path: str | Path | None = None) -> dict[str, Any]:
    """The merge-plan mapping of a mergekit config ``raw`` (read from ``path``); a model
    ``BASE+LORA_DIR`` (mergekit's syntax, split at the first ``+``) becomes ``{path: BASE,
    lora: LORA_DIR}``."""
    where = f"mergekit config {path}" if path else "mergekit config"
    unknown = sorted(set(raw) - set(MERGEKIT_KEYS) - set(RUN_KEYS))
    check(not unknown, where, f"unknown key(s) {unknown}; mergekit keys: {list(MERGEKIT_KEYS)}, "
          f"project keys: {list(RUN_KEYS)}")
    check(raw.get("modules") is None, f"{where}: modules",
          "multi-module configs (`modules:`) are not supported; use models: or slices:")
    check(raw.get("tokenizer_source") is None or raw.get("tokenizer") is None, where,
          "give tokenizer_source or tokenizer, not both (mergekit refuses both too)")
    method = raw.get("merge_method")
    check(method in METHODS, f"{where}: merge_method",
          f"{method!r} is not supported; supported: {sorted(METHODS)}")
    check((raw.get("models") is None) != (raw.get("slices") is None), where,
          "give exactly one of `models:` or `slices:`")
    ids = _Ids(where)
    base = ids.add(raw["base_model"], "base_model") if raw.get("base_model") is not None else None
    keymap = METHODS[method]
    ignored = [f"{k}: {raw[k]!r}" for k in IGNORED_KEYS if k in raw]
    data: dict[str, Any] = {"method": method, "space": raw.get("space", "weight"), "rest": "weight",
                            "arithmetic": "dtype",
                            "origin": (f"mergekit:{path}" if path else "mergekit")
                            + (f" (ignored, no effect on the merge: {'; '.join(ignored)})" if ignored else "")}
    data |= {k: raw[k] for k in RUN_KEYS if k in raw}
    seen: set[str] = set()
    if raw.get("models") is not None:
        models = _list(raw["models"], f"{where}: models")
        order = []
        for i, m in enumerate(models):
            mid = ids.add(_field(m, "model", f"{where}: models[{i}]"), f"models[{i}].model")
            check(mid not in order, f"{where}: models[{i}]", f"lists model {ids.path(mid)!r} twice")
            order.append(mid)
            ids.params[mid] = _translate(m.get("parameters"), method, keymap, f"models[{i}].parameters",
                                         per_input=True, seen=seen)
        if base is not None and base not in order:
            order.append(base)  # mergekit adds the base model to the inputs
        inputs = _inputs(method, order, base)
    else:
        slices = []
        for k, s in enumerate(_list(raw["slices"], f"{where}: slices")):
            check(isinstance(s, Mapping), f"{where}: slices[{k}]", f"expected a mapping, got {s!r}")
            check(s.get("residual_weight") is None, f"{where}: slices[{k}].residual_weight", "is not supported")
            extra = sorted(set(s) - {"sources", "base_model", "parameters", "residual_weight"})
            check(not extra, f"{where}: slices[{k}]", f"unknown key(s) {extra}")
            sources = []
            for j, src in enumerate(_list(s.get("sources"), f"{where}: slices[{k}].sources")):
                w = f"slices[{k}].sources[{j}]"
                mid = ids.add(_field(src, "model", f"{where}: {w}"), f"{w}.model")
                lr = src.get("layer_range")
                check(isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr),
                      f"{where}: {w}.layer_range", f"must be [start, end], got {lr!r}")
                extra = sorted(set(src) - {"model", "layer_range", "parameters"})
                check(not extra, f"{where}: {w}", f"unknown key(s) {extra}")
                sources.append({"model": mid, "layers": list(lr), "params": _translate(
                    src.get("parameters"), method, keymap, f"{w}.parameters", per_input=True, seen=seen)})
            sb = ids.add(s["base_model"], f"slices[{k}].base_model") if s.get("base_model") else None
            slices.append({"sources": sources, "base": sb, "params": _translate(
                s.get("parameters"), method, keymap, f"slices[{k}].parameters", seen=seen)})
        data["slices"] = slices
        order = list(ids.ids)
        inputs = None
    # in mergekit's order of a tensor's inputs (the models as listed, the base appended): the
    # order a token's default row is averaged in (lsm_dist.merge.vocab)
    data["models"] = {m: {"path": ids.path(m), **({"lora": ids.lora[m]} if m in ids.lora else {}),
                          "params": ids.params.get(m, {})} for m in order}
    data["tensor_params"] = _translate(raw.get("parameters"), method, keymap, "parameters", seen=seen)
    params: dict[str, Any] = dict(DEFAULTS)
    if method in RESCALE_DEFAULT:
        params["rescale"] = RESCALE_DEFAULT[method]
    data["params"] = params
    if base is not None:
        data["base"] = base
    data["target"] = base or order[0]
    if inputs is not None:
        data["inputs"] = inputs
    if raw.get("tokenizer_source") is not None:
        data["tokenizer"] = _tokenizer_source(raw["tokenizer_source"], ids, base, f"{where}: tokenizer_source")
    elif raw.get("tokenizer") is not None:
        data["tokenizer"] = _tokenizer_block(raw["tokenizer"], ids, base, f"{where}: tokenizer")
    if raw.get("chat_template") is not None:
        check(isinstance(raw["chat_template"], str) and bool(raw["chat_template"]), f"{where}: chat_template",
              f"expected auto, a template name or Jinja text, got {raw['chat_template']!r}")
        data["chat_template"] = raw["chat_template"]
    for key in ("dtype", "out_dtype"):
        v = raw.get(key)
        if v is not None:
            v = str(v).removeprefix("torch.")
            check(v in DTYPES, f"{where}: {key}", f"{raw[key]!r} is not one of {list(DTYPES)}")
            data[key] = v
    _check_required(method, seen, where)
    dropped = sorted(k for k in seen if keymap.get(k, "") is None)
    if dropped:  # parameters mergekit accepts that change no value (int8_mask: a memory layout)
        data["origin"] += f" (parameters without effect on the values, ignored: {', '.join(dropped)})"
    return data


def _tokenizer_source(ref: Any, ids: _Ids, base: str | None, where: str) -> dict[str, Any]:
    """``tokenizer_source`` / ``tokenizer.source`` → the plan's ``tokenizer`` source keys."""
    if ref == "union":
        return {"source": "union"}
    if ref == "base":
        check(base is not None, where, "`base` needs a base_model (mergekit would take an arbitrary model)")
        return {"source": "base"}
    mid = ids.lookup(ref)
    check(mid is not None, where, f"{ref!r} is neither union, base nor a model of this config "
          f"({sorted(ids.by_ref)}); the output tokenizer is taken from one of the merged models")
    return {"source": "model", "model": mid}


def _tokenizer_block(block: Any, ids: _Ids, base: str | None, where: str) -> dict[str, Any]:
    """mergekit's ``tokenizer: {source, tokens, pad_to_multiple_of}`` → the plan's ``tokenizer``."""
    check(isinstance(block, Mapping), where, f"expected a mapping, got {block!r}")
    extra = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
    check(not extra, where, f"unknown key(s) {extra}; known: ['pad_to_multiple_of', 'source', 'tokens']")
    out = _tokenizer_source(block.get("source", "union"), ids, base, f"{where}.source")
    tokens = block.get("tokens") or {}
    check(isinstance(tokens, Mapping), f"{where}.tokens", f"expected a mapping token -> {{source, force}}, got {tokens!r}")
    out["tokens"] = {}
    for tok, entry in tokens.items():
        w = f"{where}.tokens[{tok!r}]"
        check(isinstance(tok, str) and bool(tok), w, "a token must be a non-empty string")
        check(isinstance(entry, Mapping), w, f"expected a mapping {{source, force}}, got {entry!r}")
        extra = sorted(set(entry) - {"source", "force"})
        check(not extra, w, f"unknown key(s) {extra}; known: ['force', 'source']")
        force = entry.get("force", False)
        check(isinstance(force, bool), f"{w}.force", f"expected true or false, got {force!r}")
        out["tokens"][tok] = {"source": _token_source(entry.get("source"), ids, f"{w}.source"), "force": force}
    pad = block.get("pad_to_multiple_of")
    if pad is not None:
        check(isinstance(pad, int) and not isinstance(pad, bool) and pad > 0, f"{where}.pad_to_multiple_of",
              f"expected a positive integer, got {pad!r}")
        out["pad_to_multiple_of"] = pad
    return out


def _token_source(src: Any, ids: _Ids, where: str) -> Any:
    """A token's source: a model reference → its id; ``{kind: model_token, model, ...}`` with the
    model's id; ``{kind: zero}``; null."""
    def model_id(ref: Any, w: str) -> str:
        mid = ids.lookup(ref)
        check(mid is not None, w, f"{ref!r} names no model of this config ({sorted(ids.by_ref)})")
        return mid

    if src is None or isinstance(src, str):
        return None if src is None else model_id(src, where)
    check(isinstance(src, Mapping) and src.get("kind") in ("zero", "model_token"), where,
          f"expected a model, {{kind: zero}} or {{kind: model_token, model, token | token_id}}, got {src!r}")
    if src["kind"] == "zero":
        check(set(src) == {"kind"}, where, f"{{kind: zero}} takes no other key, got {sorted(src)}")
        return {"kind": "zero"}
    extra = sorted(set(src) - {"kind", "model", "token", "token_id"})
    check(not extra, where, f"unknown key(s) {extra} for kind model_token")
    check(("token" in src) != ("token_id" in src), where, "give exactly one of token or token_id")
    return {**src, "model": model_id(src.get("model"), f"{where}.model")}


def _inputs(method: str, order: list[str], base: str | None) -> list[str]:
    """mergekit's input order: the configured models, the base where the method has none."""
    if method in ("linear", "karcher", "passthrough"):
        return list(order)
    if method == "slerp":
        check(base is not None, "base_model", "slerp needs a base_model (t = 0 gives it)")
        others = [m for m in order if m != base]
        check(len(others) == 1, "models", f"slerp merges the base and one other model, got {order}")
        return [base, others[0]]
    return [m for m in order if m != base]


def _check_required(method: str, seen: set[str], where: str) -> None:
    for key in REQUIRED.get(method, []):
        check(key in seen, f"{where}: parameters", f"merge_method {method} needs `{key}` "
              "(per model or in `parameters:`), as mergekit requires")


def _list(v: Any, where: str) -> list:
    check(isinstance(v, list) and bool(v), where, f"expected a non-empty list, got {v!r}")
    return v


def _field(entry: Any, key: str, where: str) -> Any:
    check(isinstance(entry, Mapping) and key in entry, where, f"expected a mapping with `{key}`, got {entry!r}")
    return entry[key]


class _Ids:
    """Model references → plan ids (the directory name, made unique), LoRA parts split off."""

    def __init__(self, where: str):
        self.where_file = where
        self.ids: dict[str, str] = {}  # id -> path
        self.by_ref: dict[str, str] = {}
        self.lora: dict[str, str] = {}
        self.params: dict[str, dict] = {}
        self.where: dict[str, str] = {}

    def add(self, ref: Any, where: str) -> str:
        check(isinstance(ref, str) and bool(ref.strip()), f"{self.where_file}: {where}",
              f"expected a model path, got {ref!r}")
        if ref in self.by_ref:
            return self.by_ref[ref]
        path, _, lora = ref.partition("+")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path.rstrip("/")).name) or "model"
        mid, n = stem, 2
        while mid in self.ids:
            mid, n = f"{stem}-{n}", n + 1
        self.ids[mid] = path
        self.by_ref[ref] = mid
        self.where[mid] = where
        if lora:
            self.lora[mid] = lora
        return mid

    def path(self, mid: str) -> str:
        return self.ids[mid]

    def lookup(self, ref: Any) -> str | None:
        return self.by_ref.get(ref) if isinstance(ref, str) else None


def _translate(params: Any, method: str, keymap: Mapping[str, str | None], where: str,
               per_input: bool = False, seen: set[str] | None = None) -> dict[str, Any]:
    """mergekit ``parameters:`` → project settings (names and a few values translated)."""
    if params is None:
        return {}
    check(isinstance(params, Mapping), where, f"expected a mapping, got {params!r}")
    out: dict[str, Any] = {}
    for key, value in params.items():
        check(key in keymap, f"{where}.{key}",
              f"is not a parameter of mergekit's {method}; known: {sorted(keymap)}")
        check_setting(value, f"{where}.{key}")
        if seen is not None:
            seen.add(key)
        target = keymap[key]
        if target is None:  # accepted, no effect on the values (int8_mask, eps)
            continue
        check(not per_input or key in PER_INPUT, f"{where}.{key}",
              "is shared by the inputs: mergekit reads it only from `parameters:` (top level or slice)")
        if target == "granularity":
            check(isinstance(value, bool), f"{where}.{key}", "only a plain true/false is supported here")
            out["granularity"] = _granularity(key, value, params)
            continue
        out[target] = _map_values(value, _VALUE_MAPS.get(key))
    return out


def _granularity(key: str, value: bool, params: Mapping[str, Any]) -> str:
    if key == "filter_wise":
        return "vector" if value else "tensor"
    flatten = params.get("nuslerp_flatten", True)
    row_wise = params.get("nuslerp_row_wise", False)
    return "tensor" if flatten else ("column" if row_wise else "vector")


_VALUE_MAPS: dict[str, Callable[[Any], Any]] = {
    "rescale": lambda v: ("l1" if v else "none") if isinstance(v, bool) else v,
}


def _map_values(value: Any, fn: Callable[[Any], Any] | None) -> Any:
    if fn is None:
        return value
    if isinstance(value, list):
        return [_map_values(v, fn) for v in value]
    if isinstance(value, Mapping):
        return {k: (_map_values(v, fn) if k == "value" else v) for k, v in value.items()}
    return fn(value)
