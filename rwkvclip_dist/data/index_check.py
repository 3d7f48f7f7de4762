"""Checks of a stream's ``index.json`` and shard files before Streaming reads them.

Streaming trusts its index: a truncated shard fails deep inside its reader ("not enough values to
unpack"), a field of the wrong type fails with a bare ``TypeError``, and a shard ``basename`` such as
``../../x`` makes it read, or for a remote stream download and write, outside the stream's directory.
Each of these becomes an error that names the file, the field and what is wrong.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any


class ShardIndexError(ValueError):
    """An index.json or a shard it lists is malformed, truncated or unsafe."""


def _field(index: Path, where: str, value: Any, kind: type | tuple, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ShardIndexError(f"{index}: {where} must be {what}, got {value!r}")
    return value


def safe_basename(index: Path | str, where: str, name: Any) -> str:
    """``name`` if it is a plain relative path inside the stream directory."""
    _field(Path(index), where, name, str, "a file name")
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ShardIndexError(f"{index}: {where} {name!r} points outside the stream directory")
    return name


def check_local_index(directory: str | Path) -> None:
    """Check ``directory/index.json`` and the sizes of the shard files that are present."""
    index = Path(directory) / "index.json"
    try:
        data = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardIndexError(f"{index}: not valid JSON ({err}); rebuild it with tools/make_shards.py") from None
    _field(index, "the top level", data, dict, "a mapping")
    shards = _field(index, "'shards'", data.get("shards"), list, "a list")
    for i, shard in enumerate(shards):
        where = f"shards[{i}]"
        _field(index, where, shard, dict, "a mapping")
        _field(index, f"{where}.samples", shard.get("samples"), int, "an integer")
        files = []
        for key in ("raw_data", "zip_data"):
            entry = shard.get(key)
            if entry is None and key == "zip_data":
                continue
            _field(index, f"{where}.{key}", entry, dict, "a mapping")
            name = safe_basename(index, f"{where}.{key}.basename", entry.get("basename"))
            size = _field(index, f"{where}.{key}.bytes", entry.get("bytes"), int, "an integer")
            files.append((Path(directory) / name, size))
        present = [(path, size) for path, size in files if path.is_file()]
        if not present:
            raise ShardIndexError(f"{index}: {where} lists {', '.join(str(p) for p, _ in files)}, which "
                                  f"does not exist")
        for path, size in present:
            actual = os.path.getsize(path)
            if actual != size:
                raise ShardIndexError(f"{path}: {actual} bytes, but {index} says {size} (truncated or "
                                      f"replaced; re-copy or rebuild the shard)")


def check_local_indexes_once_per_node(directories: list[str | Path]) -> None:
    """:func:`check_local_index` for every directory, read once per node instead of once per rank.

    Streaming parses every index on every rank anyway (docs/data.md, "Large indexes"); our check need
    not add one more parse per rank. Under a process group the node's local rank 0 checks and every
    rank raises the same :class:`ShardIndexError` (the first one found, naming its stream); without
    one (a single process, or ranks that never formed a group), every process checks for itself.
    """
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    problem = None
    if not grouped or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            for directory in directories:
                check_local_index(directory)
        except ShardIndexError as err:
            problem = str(err)
    if grouped:
        found: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p is not None), None)
    if problem is not None:
        raise ShardIndexError(problem)
