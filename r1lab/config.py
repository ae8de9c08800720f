"""Dataclass configs from YAML recipes plus dotted command-line overrides.

    cfg = load_config(GRPOConfig, "recipes/zero.yaml", ["train.lr=1e-6", "rollout.group_size=16"])

- Values (in files and overrides) are read with YAML safe_load rules ("3" → int, "true" → bool, "[1, 2]" →
  list, "null" → None), plus one fix: PyYAML follows YAML 1.1, where `1e-6` (no dot) is a *string*; here
  every decimal or exponent number is a float.
- An override whose target field is a str keeps its raw text ("run.name=007" stays "007").
- Unknown keys, wrong types and missing required fields raise ConfigError naming the dotted key and where
  it came from (file or override), with the valid keys and a did-you-mean suggestion.
- Sections may be given partially: missing fields keep their defaults (including defaults that come from a
  default_factory instance); a dict-typed field merges over its default dict the same way.
- `to_dict(cfg)` gives plain data for config.yaml; load_config(cls, that file) rebuilds the same config.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from r1lab.errors import InputError


class ConfigError(InputError):
    """A bad recipe or override; the message names the key path and its source."""


# ----------------------------------------------------------------------------- YAML with real floats
class _Loader(yaml.SafeLoader):
    pass


# YAML 1.1's float pattern demands a dot ("1.0e-6"); accept "1e-6", "1E+5", "-2e3", ".5" too.
_FLOAT = re.compile(
    r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+
    |\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _resolvers[:] = [(tag, rx) for tag, rx in _resolvers if tag != "tag:yaml.org,2002:float"]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_value(text: str) -> Any:
    """One override value with YAML rules (see module doc); text that is not valid YAML stays a string."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def read_yaml(path: str | Path) -> dict:
    """A recipe file as a dict (empty file → {}); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- overrides
class _Override:
    """A value set on the command line: its parsed form and its raw text (used for str fields)."""

    def __init__(self, raw: str, source: str):
        self.raw, self.value, self.source = raw, parse_value(raw), source


class _Section(dict):
    """A section created by an override (so errors inside it can name that override)."""

    source = "defaults"


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {item!r}: bad key path {key!r}")
    node = data
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if isinstance(child, _Override) and isinstance(child.value, dict):
            child = dict(child.value)  # a whole section given earlier as a mapping, now refined
        if child is None:
            child = _Section()
            child.source = f"override {item!r}"
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node[p] = child
        node = child
    node[parts[-1]] = _Override(raw, f"override {item!r}")


# ----------------------------------------------------------------------------- building dataclasses
def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """value (already parsed) as type tp, or ConfigError naming key."""
    raw = value.raw if isinstance(value, _Override) else None
    if isinstance(value, _Override):
        where, value = value.source, value.value

    def fail(extra: str = "") -> ConfigError:
        shown = _plain(value)
        got = f"{shown!r} ({type(shown).__name__})"
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {got} in {where}{extra}")

    if tp is Any or tp is typing.Any:
        return _plain(value)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        if raw is not None and str in options:
            return raw
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key, where)
            except ConfigError as e:
                errors.append(e)
        raise fail()
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if raw is not None and raw in choices:
            return raw
        raise ConfigError(f"{key}: {value!r} in {where} is not one of {', '.join(map(repr, choices))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail(" (a section of keys)")
        return _build(tp, value, key, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail(f" ({len(args)} items expected)")
            return tuple(_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, key, where): _coerce(v, v_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # "1e3" for a count is fine; 2.5 is not
        raise fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is str:
        if raw is not None:
            return raw
        if isinstance(value, str):
            return value
        raise fail(" (quote it in YAML to make it a string)")
    if tp is Path:
        if raw is not None:
            return Path(raw)
        if isinstance(value, (str, Path)):
            return Path(value)
        raise fail()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise fail()
    return value  # an annotation we do not interpret: pass through


def _plain(value: Any) -> Any:
    """value with override wrappers removed (for error messages)."""
    if isinstance(value, _Override):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _unknown_key(cls: type, key: str, path: str, where: str, names: list[str]) -> ConfigError:
    full = f"{path}.{key}" if path else key
    section = f"under {path!r}" if path else f"of {cls.__name__}"
    guess = difflib.get_close_matches(str(key), names, n=1)
    hint = f"; did you mean {(f'{path}.' if path else '') + guess[0]!r}?" if guess else ""
    return ConfigError(f"unknown key {full!r} in {where}{hint} Valid keys {section}: {', '.join(names)}")


def _build(cls: type, data: dict, path: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(fields)
    for key, value in data.items():
        if key not in fields:
            src = getattr(value, "source", where) if isinstance(value, (_Override, _Section)) else where
            raise _unknown_key(cls, key, path, src, names)
    kwargs, sources = {}, {}  # field → value, field → where its value came from
    for name, f in fields.items():
        full = f"{path}.{name}" if path else name
        if name in data:
            value = data[name]
            src = value.source if isinstance(value, (_Override, _Section)) else where
            if isinstance(value, _Override) and isinstance(value.value, dict):
                value = value.value
            # A partial section merges over the field's default (a dataclass instance, which may differ
            # from the class defaults when it comes from a default_factory, or a dict).
            if isinstance(value, dict):
                default = _default(f)
                if dataclasses.is_dataclass(default) and not isinstance(default, type):
                    value = _deep_merge(to_dict(default), value)
                elif isinstance(default, dict):
                    value = _deep_merge(default, value)
            kwargs[name] = _coerce(value, hints[name], full, src)
            sources[name] = src
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {full!r} in {where}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ validation; its message starts with the field's name
        named = next((sources[n] for n in sources if str(e).startswith(f"{n} ")), where)
        raise ConfigError(f"{path or cls.__name__} in {named}: {e}") from None


def _deep_merge(base: dict, top: dict) -> dict:
    """top over base, recursing into sections present in both; top's section type (and source) wins."""
    out = type(top)(base) if isinstance(top, _Section) else dict(base)
    if isinstance(top, _Section):
        out.source = top.source
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            out[k] = _deep_merge(base[k], v)
        else:
            out[k] = v
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def load_config(cls: type, yaml_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """An instance of dataclass cls from a YAML recipe (optional) and dotted overrides applied in order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    data = read_yaml(yaml_path) if yaml_path is not None else {}
    where = str(yaml_path) if yaml_path is not None else "defaults"
    for item in overrides:
        _apply_override(data, item)
    return _build(cls, data, "", where)


def check_ranges(cfg: Any, *, at_least: dict[str, float] | None = None, positive: tuple[str, ...] = (),
                 unit: tuple[str, ...] = ()) -> None:
    """For a config's __post_init__: ValueError naming the first field outside its range. at_least: {field:
    minimum}; positive: fields that must be > 0; unit: fields in (0, 1] (e.g. top_p). load_config turns the
    ValueError into a ConfigError that also names the section and where the value came from."""
    for name, low in (at_least or {}).items():
        if getattr(cfg, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(cfg, name)}")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in unit:
        if not 0 < getattr(cfg, name) <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {getattr(cfg, name)}")


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, str/int/float/bool/None) of a dataclass config, for YAML/JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg
