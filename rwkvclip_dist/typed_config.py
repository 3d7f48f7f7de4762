"""Type-checked construction of nested dataclasses from plain YAML or JSON data.

One loader for every config in the package: training recipes (``rwkvclip_dist.training.recipe``) and the
model registry's JSON files (``rwkvclip_dist.model.config``). The field annotations are the schema: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Any`` and nested dataclasses.
Every error names the dotted key and where it came from (the ``origin`` of each key, e.g. a file).

Fields declared with :func:`path_field` are file-system paths: a relative value resolves against the
folder of the file that set it (a :class:`FileOrigin`), anything else (the command line) against the
current directory, and the loader can check that it exists, so a wrong path is an error naming its key.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

import yaml


class ConfigError(ValueError):
    """A config names an unknown key or holds a value of the wrong type."""


class FieldError(ValueError):
    """Raised by a config dataclass's ``__post_init__`` for a bad value of one of its fields, so the
    loader can name the dotted key and the file (or command line) that set it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class FileOrigin(str):
    """An origin label (e.g. ``"recipe /abs/r.yaml"``) for keys set in a file; relative paths that file
    sets resolve against ``directory``."""

    directory: Path

    def __new__(cls, label: str, directory: str | Path) -> "FileOrigin":
        obj = super().__new__(cls, label)
        obj.directory = Path(directory)
        return obj


@dataclasses.dataclass(frozen=True)
class PathSpec:
    """What :func:`path_field` declares about a path field."""

    exists: Literal["file", "dir", "any", None] = None
    """Check at load (unless the caller skips path checks) that the path is an existing file or
    directory ('any': either)."""
    inside: str | None = None
    """A file that must be inside the directory, e.g. ``index.json``."""
    is_path: Callable[[str], bool] | None = None
    """Whether a value is a path at all (URLs and shipped names are not); default: all non-URLs."""


def path_field(default: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field holding a path; ``spec`` as in :class:`PathSpec`. Empty values are left alone."""
    return dataclasses.field(default=default, metadata={"path": PathSpec(**spec)})


def is_url(value: str) -> bool:
    """``s3://bucket/x``, ``https://...``: a scheme of two letters or more (not a Windows drive)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", value) is not None


class _Context(NamedTuple):
    origin: dict[str, str]
    default_file: str
    check_paths: bool


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _fail(key: str, ctx: _Context, message: str) -> ConfigError:
    return ConfigError(f"{_origin_of(key, ctx)}: {key}: {message}")


def _dotted(key: str) -> str:
    """``eval.zeroshot[0].data`` (error keys) and ``eval.zeroshot.0.data`` (override keys) alike."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def _origin_of(key: str, ctx: _Context) -> str:
    """Where ``key`` was set: its own record, else the nearest enclosing key's (a list set as a whole,
    e.g. ``data.streams``), else, for a section, where its first key came from."""
    origin = {_dotted(k): v for k, v in ctx.origin.items()}
    parts = _dotted(key).split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in origin:
            return origin[".".join(parts[:end])]
    for dotted, source in origin.items():
        if dotted.startswith(_dotted(key) + "."):
            return source
    return ctx.default_file


def _resolve_path(value: str, spec: PathSpec, key: str, ctx: _Context) -> str:
    """The absolute form of a path field's value, checked to exist when the spec and ``ctx`` ask."""
    is_path = spec.is_path or (lambda v: not is_url(v))
    if not value or not is_path(value):
        return value
    source = _origin_of(key, ctx)
    in_file = isinstance(source, FileOrigin)
    base = source.directory if in_file else Path.cwd()
    path = Path(value).expanduser()
    resolved = Path(os.path.normpath(path if path.is_absolute() else base / path))
    if ctx.check_paths and spec.exists:
        relative_to = "the folder of the recipe" if in_file else "the current directory"
        given = "" if path.is_absolute() else f" (given as {value!r}, relative to {relative_to} {base})"
        if spec.exists == "dir" and not resolved.is_dir():
            raise _fail(key, ctx, f"directory {resolved}{given} does not exist")
        if spec.exists == "file" and not resolved.is_file():
            raise _fail(key, ctx, f"file {resolved}{given} does not exist")
        if spec.exists == "any" and not resolved.exists():
            raise _fail(key, ctx, f"{resolved}{given} does not exist")
        if spec.inside and not (resolved / spec.inside).is_file():
            raise _fail(key, ctx, f"{resolved}{given} has no {spec.inside}")
    return str(resolved)


def _check(value: Any, tp: Any, key: str, ctx: _Context) -> Any:
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, ctx, prefix=key + ".")
    hint_origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if hint_origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key, ctx)
            except ConfigError:
                continue
        raise _fail(key, ctx, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if hint_origin is Literal:
        # ``True in (0, 1)`` holds in Python; a bool is never one of a Literal's numbers.
        if value not in args or (isinstance(value, bool) and not any(a is value for a in args)):
            raise _fail(key, ctx, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if hint_origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(key, ctx, f"expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_check(v, item_tp, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
        return tuple(items) if hint_origin is tuple else items
    if hint_origin is dict:
        if not isinstance(value, dict):
            raise _fail(key, ctx, f"expected a mapping, got {type(value).__name__} {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _check(v, val_tp, f"{key}.{k}", ctx) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(key, ctx, f"expected a bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, ctx, f"expected an int, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads "1e-3" (no dot) as a string, so numeric strings are accepted for floats.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _fail(key, ctx, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, ctx, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(key, ctx, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise _fail(key, ctx, f"expected a path, got {value!r}")
        return Path(value)
    raise _fail(key, ctx, f"field type {tp!r} is not supported by the config loader")


def build_dataclass(cls: type, data: Any, origin: dict[str, str], default_file: str, prefix: str = "",
                    check_paths: bool = True) -> Any:
    """Instantiate ``cls`` from ``data`` (a mapping), checking every key and type recursively.

    ``origin`` maps dotted keys to where they were set (a :class:`FileOrigin` for a file);
    ``check_paths=False`` resolves path fields without checking that they exist."""
    built = _build(cls, data, _Context(origin, default_file, False), prefix)
    # Paths are checked in a second pass, so a misspelt key or a wrong value anywhere is reported first.
    return _build(cls, data, _Context(origin, default_file, True), prefix) if check_paths else built


def _build(cls: type, data: Any, ctx: _Context, prefix: str = "") -> Any:
    section = prefix.rstrip(".") or "<top level>"
    if not isinstance(data, dict):
        raise _fail(section, ctx, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise _fail(f"{prefix}{unknown[0]}", ctx,
                    f"unknown key {unknown[0]!r} (known in {section}: {', '.join(sorted(fields))})")
    kwargs = {key: _check(value, hints[key], f"{prefix}{key}", ctx) for key, value in data.items()}
    for key, value in kwargs.items():
        spec = fields[key].metadata.get("path")
        if spec is not None and isinstance(value, str):
            kwargs[key] = _resolve_path(value, spec, f"{prefix}{key}", ctx)
    try:
        return cls(**kwargs)
    except FieldError as err:
        raise _fail(f"{prefix}{err.field}", ctx, err.message) from None
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise _fail(section, ctx, str(err)) from None


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
    # Validate now, so the error says "command line"; return plain data, built with the rest later
    # (where paths are resolved and checked).
    _check(value, tp, dotted, _Context({dotted: "command line"}, "command line", False))
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
