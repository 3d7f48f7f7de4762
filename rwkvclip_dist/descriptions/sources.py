"""Input samples for the annotation jobs: JSONL files or local MDS shard directories.

Each sample needs a key plus any of raw web text, synthetic caption and tags (the description step)
or an image (the caption and tag steps). Only the columns a job needs are read from MDS shards: the
description step never touches the (much larger) image bytes, and images are never decoded here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sample:
    key: str
    raw: str = ""
    synthetic: str = ""
    tags: tuple[str, ...] = ()
    image: bytes = field(default=b"", repr=False, compare=False)
    """Encoded image bytes (JPEG, PNG, ...); read only for the caption and tag steps."""

    @property
    def has_text(self) -> bool:
        return bool(self.raw.strip() or self.synthetic.strip() or self.tags)


@dataclass(frozen=True)
class SourceFields:
    """Column (MDS) or field (JSONL) names of the sample parts; only ``key`` is mandatory."""

    key: str = "key"
    raw: str = "raw"
    synthetic: str = "synthetic"
    tags: str = "tags"
    image: str = "jpg"
    """MDS column holding the encoded image bytes."""
    image_path: str = "image_path"
    """JSONL field holding the image file's path (relative paths are from the JSONL file's folder)."""


@dataclass(frozen=True)
class ShardSpec:
    """Worker ``index`` of ``count``: owns the keys whose stable hash is ``index`` mod ``count``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not match:
            raise ValueError(f"--shard must look like i/n (e.g. 0/8), got {text!r}")
        index, count = int(match[1]), int(match[2])
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"--shard {text}: need n >= 1 and 0 <= i < n")
        return cls(index, count)

    def owns(self, key: str) -> bool:
        # blake2b rather than hash(): Python salts str hashes per process, and every worker on every
        # machine must agree on the split.
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.count == self.index


def parse_tags(value: Any, where: str) -> tuple[str, ...]:
    """Tags arrive as a list or as one string joined by ',' or '|' (the RAM++ output style)."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = re.split(r"[,|]", value)
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(part, str) for part in value):
            raise ValueError(f"{where}: tags must be strings, got {value!r}")
        parts = list(value)
    else:
        raise ValueError(f"{where}: tags must be a list or a string, got {type(value).__name__}")
    return tuple(tag for tag in (part.strip() for part in parts) if tag)


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected text, got {type(value).__name__}")
    return value


def _sample(record: dict[str, Any], fields: SourceFields, where: str, image: bytes = b"") -> Sample:
    if record.get(fields.key) in (None, ""):
        raise ValueError(f"{where}: missing field {fields.key!r} (the sample key)")
    return Sample(
        key=str(record[fields.key]),
        raw=_text(record.get(fields.raw), f"{where} field {fields.raw!r}"),
        synthetic=_text(record.get(fields.synthetic), f"{where} field {fields.synthetic!r}"),
        tags=parse_tags(record.get(fields.tags), f"{where} field {fields.tags!r}"),
        image=image,
    )


def _image_file(record: dict[str, Any], fields: SourceFields, base: Path, where: str) -> bytes:
    """Bytes of the JSONL row's image file; b"" when the row names none or the file is missing
    (the job records that sample as failed 'no_image' and goes on)."""
    value = record.get(fields.image_path)
    if value in (None, ""):
        return b""
    if not isinstance(value, str):
        raise ValueError(f"{where} field {fields.image_path!r}: expected a file path, got {type(value).__name__}")
    try:
        return (base / value).read_bytes()
    except FileNotFoundError:
        return b""


def json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each non-blank line of a JSONL file, ``where`` being ``path:line``;
    a line that is not a JSON object is an error naming it."""
    with Path(path).open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object per line")
            yield where, record


def iter_jsonl(path: Path, fields: SourceFields, with_image: bool = False) -> Iterator[Sample]:
    for where, record in json_lines(path):
        image = _image_file(record, fields, path.parent, where) if with_image else b""
        yield _sample(record, fields, where, image)


def _mds_index(root: Path) -> dict[str, Any]:
    index_path = root / "index.json"
    with index_path.open("r", encoding="utf-8") as handle:
        index = json.load(handle)
    if index.get("version") != 2 or "shards" not in index:
        raise ValueError(f"{index_path}: not a version-2 streaming index")
    return index


def iter_mds(root: Path, fields: SourceFields, with_image: bool = False) -> Iterator[Sample]:
    # Imported here: streaming pulls in torch (seconds of start-up) and only MDS input needs it.
    from rwkvclip_dist.data.mds_in_place import LocalShards

    shards = LocalShards(root)  # read where they lie: the dataset directory may be read-only or shared
    for shard_id, reader in enumerate(shards.shards):
        raw_name = reader.raw_data.basename
        columns = dict(zip(reader.column_names, reader.column_encodings, strict=True))
        if fields.key not in columns:
            raise ValueError(f"{root}/{raw_name}: no column {fields.key!r} (the sample key); has {sorted(columns)}")
        if with_image and fields.image not in columns:
            raise ValueError(f"{root}/{raw_name}: no image column {fields.image!r}; has {sorted(columns)}")
        wanted = {fields.key, fields.raw, fields.synthetic, fields.tags} & set(columns)
        if with_image:
            wanted.add(fields.image)
        for idx in range(reader.samples):
            record = _decode_columns(reader, shards.sample_bytes(shard_id, idx), wanted)
            image = (record.get(fields.image) or b"") if with_image else b""
            yield _sample(record, fields, f"{root}/{raw_name} sample {idx}", image)


def _decode_columns(reader: Any, data: bytes, wanted: set[str]) -> dict[str, Any]:
    """Decode only the wanted columns of one MDS sample (layout: variable sizes first, then values)."""
    from rwkvclip_dist.data.streaming_compat import mds_decode

    sizes = []
    pos = 0
    for fixed in reader.column_sizes:
        if fixed:
            sizes.append(fixed)
        else:
            sizes.append(int.from_bytes(data[pos : pos + 4], "little"))
            pos += 4
    record = {}
    for name, encoding, size in zip(reader.column_names, reader.column_encodings, sizes, strict=True):
        if name in wanted:
            record[name] = mds_decode(encoding, data[pos : pos + size])
        pos += size
    return record


def check_input(path: str | Path) -> str:
    """'mds' or 'jsonl' for a usable input path; a clear error otherwise."""
    path = Path(path)
    if path.is_dir():
        if not (path / "index.json").is_file():
            raise FileNotFoundError(f"{path} is a directory without index.json: not an MDS dataset")
        return "mds"
    if path.suffix.lower() in (".parquet", ".csv", ".tar", ".tsv"):
        raise ValueError(f"input {path}: build MDS shards with tools/make_shards.py first, or pass a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    return "jsonl"


def iter_samples(
    path: str | Path, fields: SourceFields = SourceFields(), with_image: bool = False
) -> Iterator[Sample]:
    """Samples from a ``.jsonl`` file or an MDS directory (one holding ``index.json``); with
    ``with_image`` each carries its encoded image bytes (MDS column or JSONL file path)."""
    reader = iter_mds if check_input(path) == "mds" else iter_jsonl
    return reader(Path(path), fields, with_image)


def count_samples(path: str | Path) -> int:
    """Cheap total for the progress bar: the MDS index, or the newline count of a JSONL file."""
    path = Path(path)
    if path.is_dir():
        return sum(int(shard["samples"]) for shard in _mds_index(path)["shards"])
    lines = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
    return lines


def load_joins(paths: tuple[Path, ...], shard: ShardSpec) -> dict[str, dict[str, Any]]:
    """key -> {synthetic?, tags?} from JSONL rows (the caption/tag steps' output, or any file in the
    make_shards --captions contract), for this shard's keys only; later files win per field."""
    joined: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--captions {path} does not exist")
        for where, record in json_lines(Path(path)):
            if record.get("key") in (None, ""):
                raise ValueError(f"{where}: expected a JSON object with a 'key'")
            key = str(record["key"])
            if not shard.owns(key):
                continue
            parts = {}
            if "synthetic" in record:
                parts["synthetic"] = _text(record["synthetic"], f"{where} field 'synthetic'")
            if "tags" in record:
                parts["tags"] = parse_tags(record["tags"], f"{where} field 'tags'")
            joined.setdefault(key, {}).update(parts)
    return joined


def apply_joins(sample: Sample, joined: dict[str, dict[str, Any]]) -> Sample:
    parts = joined.get(sample.key)
    return replace(sample, **parts) if parts else sample
