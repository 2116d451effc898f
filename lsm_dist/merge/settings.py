"""Parameter values that vary by tensor and by depth (mergekit's parameter settings), resolved
into one :class:`MergeParams` per merged tensor.

A *setting* is

- a scalar (``0.5``, ``true``, ``l1``): that value everywhere;
- a list of numbers ``[a, b, c, ...]``: a *gradient* over the layers of a slice, interpolated
  linearly at ``t = i / (n - 1)`` for the slice's i-th of n layers (``t = 1`` for a one-layer
  slice; tensors outside the layers, embeddings / final norm / head, use ``t = 0``): the value is
  ``(1 - f)·v[k] + f·v[k+1]`` with ``k = floor(t·(len - 1))``, ``f`` the remainder. A list of
  non-numbers picks ``v[floor(t·(len - 1))]``;
- a list of conditions ``[{filter: self_attn, value: ...}, ..., {value: ...}]``: the first
  condition whose ``filter`` is a substring of the tensor name (none, or ``*``, matches every
  tensor) gives the value (itself a scalar or a gradient); when none matches, the setting is
  absent for that tensor.

Sources are searched from the most specific (the model's own parameters in a slice, the
model's ``params``, the slice's ``params``) to the plan's ``tensor_params``; the first that
gives a value wins, else the plan's typed ``params``. Per-input keys (``weight``, ``density``,
``gamma``, ``epsilon``) become per-input lists (``weights``, ...) matched against that input's
own tensor name; the other keys are shared by the inputs and matched against the output
tensor's name. These are mergekit's rules (``mergekit/config.py``, ``parameter_resolver.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lsm_dist.config import ConfigError, check, from_dict
from lsm_dist.merge.operators import MergeParams

PER_INPUT = {"weight": "weights", "density": "density", "gamma": "gamma", "epsilon": "epsilon"}
SHARED = sorted({f.name for f in dataclasses.fields(MergeParams)} - {"lambda_", "weights", "density",
                                                                      "gamma", "epsilon"} | {"lambda"})
KEYS = sorted(set(PER_INPUT) | set(SHARED))


def _scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def check_setting(value: Any, where: str) -> None:
    """Structure of one setting (see module doc); ConfigError naming ``where``."""
    if _scalar(value):
        return
    if isinstance(value, Mapping):
        value = [value]
    check(isinstance(value, list) and bool(value), where,
          f"expected a value, a gradient list or a list of {{filter, value}} conditions, got {value!r}")
    if all(_scalar(v) for v in value):
        return
    for i, cond in enumerate(value):
        check(isinstance(cond, Mapping) and "value" in cond, f"{where}[{i}]",
              f"expected {{filter: ..., value: ...}}, got {cond!r}")
        extra = sorted(set(cond) - {"filter", "value"})
        check(not extra, f"{where}[{i}]", f"unknown key(s) {extra}; a condition has `filter` and `value`")
        check(cond.get("filter") is None or isinstance(cond["filter"], str), f"{where}[{i}].filter",
              f"must be a string, got {cond.get('filter')!r}")
        check(_scalar(cond["value"]) or (isinstance(cond["value"], list) and bool(cond["value"])
                                         and all(_scalar(v) for v in cond["value"])),
              f"{where}[{i}].value", f"must be a value or a gradient list, got {cond['value']!r}")


def check_settings(settings: Mapping[str, Any], where: str, keys: Sequence[str] = KEYS) -> None:
    for k, v in settings.items():
        check(k in keys, f"{where}.{k}", f"unknown parameter; known: {sorted(keys)}")
        check_setting(v, f"{where}.{k}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate(setting: Any, name: str, t: float) -> Any:
    """The value of one setting for tensor ``name`` at depth ``t`` (None: no condition matched)."""
    if _scalar(setting):
        return setting
    if isinstance(setting, Mapping):
        setting = [setting]
    if all(_scalar(v) for v in setting):
        if not all(_number(v) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        x = t * (len(setting) - 1)
        i0 = int(x)
        i1 = min(len(setting) - 1, i0 + 1)
        f = x - i0
        return (1 - f) * setting[i0] + f * setting[i1]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (name and flt in name):
            return evaluate(cond["value"], name, t)
    return None


def first_value(sources: Sequence[Mapping[str, Any] | None], key: str, name: str, t: float) -> Any:
    for src in sources:
        if src and key in src:
            v = evaluate(src[key], name, t)
            if v is not None:
                return v
    return None


def resolve_params(defaults: MergeParams, default_inputs: Sequence[str], inputs: Sequence[str],
                   shared: Sequence[Mapping[str, Any] | None],
                   per_model: Mapping[str, Sequence[Mapping[str, Any] | None]],
                   out_name: str, input_names: Mapping[str, str], t: float) -> MergeParams:
    """MergeParams of one tensor (see module doc).

    ``defaults``: the plan's typed params, whose list values follow ``default_inputs``;
    ``shared``: settings sources for shared keys (most specific first); ``per_model[m]``: the
    sources for model m's per-input keys (most specific first, then the shared ones)."""
    d = dataclasses.asdict(defaults)
    d["lambda"] = d.pop("lambda_")
    for key in SHARED:
        v = first_value(shared, key, out_name, t)
        if v is not None:
            d[key] = v
    for key, field in PER_INPUT.items():
        vals, found = [], False
        base_val = d[field]
        for m in inputs:
            v = first_value(per_model.get(m, ()), key, input_names[m], t)
            if v is None:
                v = first_value(shared, key, out_name, t)
            found = found or v is not None
            if v is None:
                if isinstance(base_val, list):
                    idx = list(default_inputs).index(m) if m in default_inputs else -1
                    check(0 <= idx < len(base_val), f"params.{field}",
                          f"has no value for input {m!r} (a list follows `inputs` {list(default_inputs)})")
                    v = base_val[idx]
                else:
                    v = base_val
            vals.append(v)
        if found and None in vals:
            missing = [m for m, v in zip(inputs, vals) if v is None]
            raise ConfigError(f"params.{field}: no {key} for input(s) {missing} of tensor {out_name} "
                              f"while others have one (set models.<id>.params.{key})")
        if found or isinstance(base_val, list):
            d[field] = vals
    d["lambda_"] = d.pop("lambda")
    try:
        p = from_dict(MergeParams, d)
    except ConfigError as e:
        raise ConfigError(f"{e} (tensor {out_name}, t={t:g})") from None
    if p.weights is not None:
        check(all(math.isfinite(w) for w in p.weights), "params.weights", f"not finite for {out_name}")
    return p
