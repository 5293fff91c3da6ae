"""One configuration schema for nodes, tools and training.

Every configurable part of the project declares a frozen dataclass whose fields carry a default,
a one-line help text and optional bounds (``setting(...)``). ``build(cls, mapping)`` turns a plain
mapping (parsed YAML, ROS parameters, CLI overrides) into that dataclass, rejecting unknown keys,
wrong types and out-of-range values with a ``ConfigError`` that names the offending field path.

Nodes map their ROS parameters onto these same dataclasses, training YAML files override their
defaults, and checkpoints store ``to_dict(config)`` so that a model can be rebuilt from the file
alone.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# Arithmetic names of inference and training (cmkd_ros.models.PRECISIONS maps them to torch
# dtypes; spelled out here so that parameters and command lines parse without torch), and auto
# (cmkd_ros.models.resolve_precision: bfloat16 where it is faster than float32).
PRECISION_CHOICES = ('float32', 'bfloat16', 'float16', 'auto')


def setting(default: Any = dataclasses.MISSING, help: str = '', *,  # noqa: A002
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: tuple | None = None, length: int | None = None,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """Declare a dataclass field with a help text and bounds checked by :func:`build`."""
    meta = {'help': help, 'ge': ge, 'gt': gt, 'le': le, 'lt': lt, 'choices': choices,
            'length': length}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (lists to tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f'{where}: {value!r} matches none of {_type_name(tp)}')
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f'{where}: {value!r} is not one of {list(args)}')
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f'{where}: expected a mapping for {tp.__name__}, '
                              f'got {type(value).__name__}')
        return build(tp, value, where)
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f'{where}: expected a list, got {type(value).__name__} {value!r}')
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f'{where}: expected {len(args)} items, got {len(value)}')
            return tuple(_convert(v, a, f'{where}[{i}]') for i, (v, a) in
                         enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_convert(v, item, f'{where}[{i}]') for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f'{where}: expected a mapping, got {type(value).__name__}')
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, f'{where}.<key>'): _convert(v, vt, f'{where}.{k}')
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{where}: expected true/false, got {value!r}')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{where}: expected an integer, got {value!r}')
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{where}: expected a number, got {value!r}')
        value = float(value)
        if value != value:
            raise ConfigError(f'{where}: NaN is not allowed')
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f'{where}: expected a string, got {value!r}')
        return value
    raise ConfigError(f'{where}: unsupported annotation {_type_name(tp)}')


def _check_bounds(value: Any, meta: Mapping, where: str) -> None:
    if value is None:
        return
    items = value if isinstance(value, tuple) and meta.get('length') is None else (value,)
    if meta.get('length') is not None and len(value) != meta['length']:
        raise ConfigError(f'{where}: expected {meta["length"]} items, got {len(value)}')
    for item in items:
        if meta.get('choices') is not None and item not in meta['choices']:
            raise ConfigError(f'{where}: {item!r} is not one of {list(meta["choices"])}')
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        for key, ok, text in (('ge', lambda a, b: a >= b, '>='), ('gt', lambda a, b: a > b, '>'),
                              ('le', lambda a, b: a <= b, '<='), ('lt', lambda a, b: a < b, '<')):
            bound = meta.get(key)
            if bound is not None and not ok(item, bound):
                raise ConfigError(f'{where}: {item!r} must be {text} {bound}')


def build(cls: type, data: Mapping[str, Any] | None = None, where: str = '') -> Any:
    """Build the frozen dataclass ``cls`` from ``data``; unknown or invalid keys raise.

    A class may define ``expand_settings(data) -> data`` (a classmethod) that fills in keys
    before the checks, e.g. a preset's values under the keys the mapping leaves out.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f'{where or cls.__name__}: expected a mapping, got '
                          f'{type(data).__name__}')
    expand = getattr(cls, 'expand_settings', None)
    if callable(expand):
        try:
            data = expand(data)
        except ConfigError as exc:
            raise ConfigError(f'{where}.{exc}' if where else str(exc)) from None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f'{where}.' if where else ''
        raise ConfigError(f'unknown setting(s) {", ".join(prefix + str(k) for k in unknown)} '
                          f'for {cls.__name__}; known: {", ".join(sorted(fields))}')
    kwargs = {}
    for name, f in fields.items():
        path = f'{where}.{name}' if where else name
        default: Any = None
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        elif name not in data:
            raise ConfigError(f'{path}: required setting is missing')
        if name not in data:
            value = default
        elif isinstance(data[name], Mapping) and isinstance(default, Mapping):
            # A mapping setting (e.g. overrides of another config) is merged into its default,
            # so ``student.da_width=0`` keeps the other default keys.
            value = _convert(merge(default, data[name]), hints[name], path)
        else:
            value = _convert(data[name], hints[name], path)
        _check_bounds(value, f.metadata, path)
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, 'validate', None)
    if callable(check):
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f'{where}: {exc}' if where else str(exc)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-safe representation of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """Merge ``override`` into a copy of ``base``: mappings merge recursively, others replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """Turn CLI overrides ``a.b=3`` into a nested mapping; values are parsed as YAML scalars
    (``a.b=`` is the empty string, e.g. to clear a path)."""
    out: dict = {}
    for item in items:
        if '=' not in item:
            raise ConfigError(f'override {item!r} must look like key.sub=value')
        key, raw = item.split('=', 1)
        node = out
        parts = key.strip().split('.')
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ''
    return out


def load_yaml(path: str) -> dict:
    """Read a YAML mapping, with a clear error for a missing file or a non-mapping document."""
    try:
        with open(path, encoding='utf-8') as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f'config file not found: {path}') from None
    except yaml.YAMLError as exc:
        raise ConfigError(f'{path}: invalid YAML: {exc}') from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f'{path}: top level must be a mapping, got {type(data).__name__}')
    return dict(data)


def load(cls: type, path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``key=value`` overrides."""
    data = load_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides))
    return build(cls, data)


def constraints_text(meta: Mapping) -> str:
    """A setting's bounds, choices and length as text (``>= 0; one of a, b``), for ROS
    parameter descriptors and the generated parameter tables."""
    bounds = (('ge', '>='), ('gt', '>'), ('le', '<='), ('lt', '<'))
    parts = [f'{text} {meta[key]}' for key, text in bounds if meta.get(key) is not None]
    if meta.get('choices') is not None:
        parts.append('one of ' + ', '.join(map(str, meta['choices'])))
    if meta.get('length') is not None:
        parts.append(f'{meta["length"]} items')
    return '; '.join(parts)


def describe(cls: type, prefix: str = '') -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) rows for documentation and ROS parameter descriptors."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, name + '.'))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((name, _type_name(tp), to_dict(default), f.metadata.get('help', '')))
    return rows
