"""Typed configuration: nested dataclasses, YAML files over the defaults, dotted CLI overrides.

Every stage has a dataclass whose fields carry their documentation in ``metadata["help"]``
(``doc("...")`` below) and whose ``__post_init__`` validates values, so a bad config fails at
construction with a message that names the field. ``load_config(Cls, yaml_path, overrides)``
builds one from defaults ← YAML ← ``a.b=value`` overrides (values parsed as YAML scalars).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def doc(help: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string (shown by ``lsm <stage> --help-config``)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def check(cond: bool, field: str, msg: str) -> None:
    """Raise ConfigError naming ``field`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{field}: {msg}")


def check_choice(value: Any, field: str, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{field}: {value!r} is not one of {choices}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _same_kind(tp: Any, value: Any) -> bool:
    if isinstance(value, dict):
        return _is_dataclass_type(tp) or typing.get_origin(tp) is dict
    if isinstance(value, (list, tuple)):
        return typing.get_origin(tp) in (list, tuple)
    return False


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` (recursively for dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors: list[ConfigError] = []
        for a in args:
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(e)
        # the alternative of the value's own kind (a mapping for a dataclass, a list for a list)
        # explains the problem best: `model.d_model: must be > 0`, not "does not match X | None"
        kind = [e for a, e in zip(args, errors) if _same_kind(a, value)]
        if len(kind) == 1 or len(errors) == 1:
            raise (kind or errors)[0]
        raise ConfigError(f"{path}: {value!r} does not match {tp}: " + "; ".join(map(str, errors)))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        out = [_coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (str, Path)):
        return str(value)
    if tp in (int, bool, str) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys fail listing the known ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    kwargs = {
        k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()
    }
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{path or cls.__name__}: {e}") from None
    except ConfigError as e:  # __post_init__ names the field within ``cls``: add where it sits
        if not path or str(e).startswith(f"{path}."):
            raise
        raise ConfigError(f"{path}.{e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _set_dotted(data: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    cur_cls: Any = cls
    cur = data
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cur_cls)} if _is_dataclass_type(cur_cls) else None
        if names is not None and part not in names:
            prefix = ".".join(parts[:i]) or cls.__name__
            raise ConfigError(f"override {key!r}: {prefix} has no field {part!r}; known: {sorted(names)}")
        if i == len(parts) - 1:
            cur[part] = value
            return
        hint = typing.get_type_hints(cur_cls)[part] if names is not None else Any
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        cur_cls = hint if _is_dataclass_type(hint) else (args[0] if args and _is_dataclass_type(args[0]) else Any)
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt


def parse_overrides(overrides: typing.Sequence[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
    return out


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping at top level, with errors that name ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {p} must hold a mapping at top level")
    return loaded


def config_data(
    cls: type, path: str | Path | None = None, overrides: typing.Sequence[str] = (), *,
    what: str = "config file", aliases: typing.Mapping[str, str] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The raw mapping ``load_config`` validates: YAML file (or ``data``, already read) ← dotted
    overrides.

    ``aliases`` maps dotted user-facing keys to field names (``params.lambda`` →
    ``params.lambda_``: a keyword cannot be a field name); they apply to the file and overrides.
    """
    if data is None:
        data = read_yaml_mapping(path, what) if path is not None else {}
    for alias, name in (aliases or {}).items():
        *parents, leaf = alias.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[name.rsplit(".", 1)[-1]] = node.pop(leaf)
    for key, value in parse_overrides(overrides):
        key = (aliases or {}).get(key, key)
        _set_dotted(data, key, value, cls)
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> T:
    """Defaults ← YAML file ← dotted overrides, validated by the dataclasses."""
    return from_dict(cls, config_data(cls, path, overrides))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field: dotted name, type, default, help (for ``--help-config``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            lines += describe(tp, name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>"
        )
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"{name} ({tname}, default {default!r}): {f.metadata.get('help', '')}")
    return lines


def resolved_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what ``save_resolved`` writes and ``--dry-run`` prints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) into a run directory."""
    from lsm_dist.utils import atomic_write_text

    atomic_write_text(Path(path), resolved_yaml(cfg))
