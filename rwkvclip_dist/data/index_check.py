"""Reading and checking a stream's ``index.json``, in one pass per rank, before Streaming uses it.

Streaming trusts its index: a truncated shard fails deep inside its reader ("not enough values to
unpack"), a field of the wrong type fails with a bare ``TypeError``, and a shard ``basename`` such as
``../../x`` makes it read, or for a remote stream download and write, outside the stream's directory.
Each of these becomes an error that names the file, the field and what is wrong.

At LAION-2B scale (230,000 shards, a 116 MiB index) the reading itself matters: :func:`read_shards`
checks each shard's entry and turns it into Streaming's reader as the JSON parser reaches it, so the
parsed document never exists whole, and the column lists every shard repeats are held once
(benchmarks/index_scale.md). Streaming's dataset reads its indexes through :func:`shards_for_stream`;
the shard files' sizes are checked once per node (:func:`check_local_indexes_once_per_node`), whose
readers local rank 0's dataset then takes instead of parsing the index again.
"""
from __future__ import annotations

import gc
import json
import os
import types
from pathlib import Path
from typing import Any

from rwkvclip_dist.data.streaming_compat import Reader, mds_reader


class ShardIndexError(ValueError):
    """An index.json or a shard it lists is malformed, truncated or unsafe."""


_NO_HASHES = types.MappingProxyType({})  # a file's ``hashes`` when it has none: one, read-only, for all
Checked = dict[str, tuple[tuple[int, int, str], list[Reader]]]
"""Readers of the indexes a process checked, by file: for its dataset (:func:`shards_for_stream`)."""


def _field(index: Path | str, where: str, value: Any, kind: type | tuple, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ShardIndexError(f"{index}: {where} must be {what}, got {value!r}")
    return value


def safe_basename(index: Path | str, where: str, name: Any) -> str:
    """``name`` if it is a plain relative path inside the stream directory."""
    _field(index, where, name, str, "a file name")
    # String tests, not PurePosixPath (the largest cost in a profile of a 230,000-shard index); the
    # same rule: absolute, or with a '..' part, or a Windows separator.
    if not name or name.startswith("/") or "\\" in name or ".." in name.split("/"):
        raise ShardIndexError(f"{index}: {where} {name!r} points outside the stream directory")
    return name


def _check_entry(index: Path, where: str, shard: Any) -> None:
    _field(index, where, shard, dict, "a mapping")
    _field(index, f"{where}.samples", shard.get("samples"), int, "an integer")
    for key in ("raw_data", "zip_data"):
        entry = shard.get(key)
        if entry is None and key == "zip_data":
            continue
        _field(index, f"{where}.{key}", entry, dict, "a mapping")
        safe_basename(index, f"{where}.{key}.basename", entry.get("basename"))
        _field(index, f"{where}.{key}.bytes", entry.get("bytes"), int, "an integer")


def read_shards(index: str | Path, dirname: str, split: str | None = None) -> list[Reader]:
    """Streaming's readers of the shards ``index`` lists (their files under ``dirname``/``split``),
    each entry checked (:class:`ShardIndexError` naming the file and field) before it becomes one."""
    index = Path(index)
    shared: dict[Any, Any] = {}
    count = [0]

    def entry(obj: dict[str, Any]) -> Any:
        # Called for every JSON object, innermost first: a shard's files, then the shard.
        if "samples" not in obj:
            return obj if obj else _NO_HASHES
        where = f"shards[{count[0]}]"
        count[0] += 1
        _check_entry(index, where, obj)
        for key in ("column_encodings", "column_names", "column_sizes", "hashes", "compression", "size_limit"):
            value = obj.get(key)
            try:
                obj[key] = shared.setdefault((key, *value) if isinstance(value, list) else (key, value), value)
            except TypeError:  # unhashable items: this shard keeps its own
                pass
        try:
            return mds_reader(dirname, split, obj)
        except (KeyError, TypeError, ValueError) as err:
            raise ShardIndexError(f"{index}: {where} is not a valid shard entry ({type(err).__name__}: {err})") from None

    # Without the cyclic collector while the readers are made: they hold no cycles, and its passes over
    # the growing heap were 40% of the time (230,000 shards: 3.4 s of CPU with it, 2.0 s without).
    collecting = gc.isenabled()
    gc.disable()
    try:
        data = json.loads(index.read_bytes(), object_hook=entry)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardIndexError(f"{index}: not valid JSON ({err}); rebuild it with tools/make_shards.py") from None
    finally:
        if collecting:
            gc.enable()
    data = {} if data is _NO_HASHES else data
    _field(index, "the top level", data, dict, "a mapping")
    shards = _field(index, "'shards'", data.get("shards"), list, "a list")
    for i, shard in enumerate(shards):
        if not isinstance(shard, Reader):
            _check_entry(index, f"shards[{i}]", {} if shard is _NO_HASHES else shard)  # an entry without 'samples': raises, naming it
    return shards


def _check_files(directory: Path, index: Path, shards: list[Reader]) -> None:
    for i, shard in enumerate(shards):
        files = [(f"{directory}/{f.basename}", f.bytes) for f in (shard.raw_data, shard.zip_data) if f]
        present = 0
        for path, size in files:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            present += 1
            if stat.st_size != size:
                raise ShardIndexError(f"{path}: {stat.st_size} bytes, but {index} says {size} (truncated or "
                                      f"replaced; re-copy or rebuild the shard)")
        if not present:
            raise ShardIndexError(f"{index}: shards[{i}] lists {', '.join(p for p, _ in files)}, which "
                                  f"does not exist")


def _signature(index: Path, dirname: str) -> tuple[int, int, str]:
    stat = index.stat()
    return stat.st_mtime_ns, stat.st_size, dirname


def check_local_index(directory: str | Path, checked: Checked | None = None) -> list[Reader]:
    """Check ``directory/index.json`` and the sizes of the shard files that are present; its readers
    (also kept in ``checked``)."""
    index = Path(directory) / "index.json"
    signature = _signature(index, str(directory))
    shards = read_shards(index, str(directory))
    _check_files(Path(directory), index, shards)
    if checked is not None:
        checked[str(index.resolve())] = signature, shards
    return shards


def shards_for_stream(checked: Checked, filename: str, local: str, split: str) -> list[Reader]:
    """``IndexedStream``'s reader of an index: the readers :func:`check_local_index` built for
    ``checked`` if the file is unchanged since (and read for the same directory), read otherwise."""
    signature, shards = checked.pop(str(Path(filename).resolve()), (None, None))
    if shards is not None and not split and signature == _signature(Path(filename), local):
        return shards
    return read_shards(filename, local, split)


def check_local_indexes_once_per_node(directories: list[str | Path], checked: Checked | None = None) -> None:
    """:func:`check_local_index` for every directory, read once per node instead of once per rank.

    Under a process group the node's local rank 0 checks (its dataset then takes the readers from
    ``checked``) and
    every rank raises the same :class:`ShardIndexError` (the first one found, naming its stream);
    without one (a single process, or ranks that never formed a group), every process checks itself.
    """
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    problem = None
    if not grouped or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            for directory in directories:
                check_local_index(directory, checked)
        except ShardIndexError as err:
            problem = str(err)
    if grouped:
        found: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p is not None), None)
    if problem is not None:
        raise ShardIndexError(problem)
