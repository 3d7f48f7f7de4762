"""Type-checked construction of nested dataclasses from plain YAML or JSON data.

One loader for every config in the package: training recipes (``rwkvclip_dist.training.recipe``) and the
model registry's JSON files (``rwkvclip_dist.model.config``). The field annotations are the schema: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Any`` and nested dataclasses.
Every error names the dotted key and where it came from (the ``origin`` of each key, e.g. a file).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config names an unknown key or holds a value of the wrong type."""


class FieldError(ValueError):
    """Raised by a config dataclass's ``__post_init__`` for a bad value of one of its fields, so the
    loader can name the dotted key and the file (or command line) that set it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _fail(key: str, origin: dict[str, str], default_file: str, message: str) -> ConfigError:
    where = _origin_of(key, origin, default_file)
    return ConfigError(f"{where}: {key}: {message}")


def _origin_of(key: str, origin: dict[str, str], default_file: str) -> str:
    # A leaf records its own file; a section's error reports where its first key came from.
    if key in origin:
        return origin[key]
    for dotted, source in origin.items():
        if dotted.startswith(key + "."):
            return source
    return default_file


def _check(value: Any, tp: Any, key: str, origin: dict[str, str], default_file: str) -> Any:
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, origin, default_file, prefix=key + ".")
    hint_origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if hint_origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key, origin, default_file)
            except ConfigError:
                continue
        raise _fail(key, origin, default_file, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if hint_origin is Literal:
        # ``True in (0, 1)`` holds in Python; a bool is never one of a Literal's numbers.
        if value not in args or (isinstance(value, bool) and not any(a is value for a in args)):
            raise _fail(key, origin, default_file, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if hint_origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(key, origin, default_file, f"expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_check(v, item_tp, f"{key}[{i}]", origin, default_file) for i, v in enumerate(value)]
        return tuple(items) if hint_origin is tuple else items
    if hint_origin is dict:
        if not isinstance(value, dict):
            raise _fail(key, origin, default_file, f"expected a mapping, got {type(value).__name__} {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _check(v, val_tp, f"{key}.{k}", origin, default_file) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(key, origin, default_file, f"expected a bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, origin, default_file, f"expected an int, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads "1e-3" (no dot) as a string, so numeric strings are accepted for floats.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _fail(key, origin, default_file, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, origin, default_file, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(key, origin, default_file, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise _fail(key, origin, default_file, f"expected a path, got {value!r}")
        return Path(value)
    raise _fail(key, origin, default_file, f"field type {tp!r} is not supported by the config loader")


def build_dataclass(cls: type, data: Any, origin: dict[str, str], default_file: str, prefix: str = "") -> Any:
    """Instantiate ``cls`` from ``data`` (a mapping), checking every key and type recursively."""
    section = prefix.rstrip(".") or "<top level>"
    if not isinstance(data, dict):
        raise _fail(section, origin, default_file, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise _fail(dotted, origin, default_file, f"unknown key {key!r} (known in {section}: {', '.join(sorted(fields))})")
        kwargs[key] = _check(value, hints[key], dotted, origin, default_file)
    try:
        return cls(**kwargs)
    except FieldError as err:
        raise _fail(f"{prefix}{err.field}", origin, default_file, err.message) from None
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise _fail(section, origin, default_file, str(err)) from None


def field_type(cls: type, dotted: str) -> Any:
    """The annotated type of a dotted field path, or a ConfigError naming the unknown part."""
    tp: Any = cls
    for i, part in enumerate(dotted.split(".")):
        if typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
            continue
        if typing.get_origin(tp) is list and part.isdigit():
            tp = typing.get_args(tp)[0] if typing.get_args(tp) else Any
            continue
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"command line: {dotted}: {'.'.join(dotted.split('.')[:i])} has no sub-keys")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ConfigError(f"command line: {dotted}: unknown key {part!r} (known: {', '.join(sorted(hints))})")
        tp = hints[part]
    return tp


def parse_override(cls: type, dotted: str, raw: str) -> Any:
    """Parse the text of a ``key=value`` override according to the field's annotated type."""
    tp = field_type(cls, dotted)
    if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return raw
    if tp is bool:
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"command line: {dotted}: expected a bool (true/false), got {raw!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: {dotted}: cannot parse {raw!r}: {err}") from None
    # Validate now, so the error says "command line"; return plain data, built with the rest later.
    _check(value, tp, dotted, {dotted: "command line"}, "command line")
    return value


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and paths as plain YAML-safe data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
