"""Readers for the shard builder's inputs: webdataset tars, parquet/CSV tables, image folders.

Each reader turns one *unit* of input (a tar, a table, a slice of a folder) into ``RawSample`` records
with undecoded payloads; validation (image decode, text checks, duplicates) happens in ``builder.py`` so
that every input kind is judged by the same rules.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TABLE_EXTS = (".parquet", ".csv")
FOLDER_CHUNK = 2048  # images per unit when a folder is split for the worker pool

# Column names a table may use, in order of preference.
KEY_COLUMNS = ("key",)
IMAGE_BYTES_COLUMNS = ("jpg", "image", "image_bytes")
IMAGE_PATH_COLUMNS = ("image_path", "path", "filepath", "file")
RAW_COLUMNS = ("raw", "caption", "text", "alt")


@dataclass
class RawSample:
    """One input sample before validation; text fields are bytes so that UTF-8 is checked in one place."""

    key: str
    source: str
    image: bytes | None = None
    image_error: str | None = None   # set when the image could not be read at all (e.g. missing file)
    raw: bytes | None = None
    synthetic: bytes | str | None = None
    generated: bytes | str | None = None
    tags: list | None = None
    meta_error: str | None = None    # unreadable sidecar JSON or tags column
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    """A piece of input processed by one worker and written to its own MDS part directory."""

    kind: str        # "tar" | "table" | "folder"
    path: str        # file, or folder root
    files: tuple[str, ...] = ()  # for folder units: the image files (relative to path)

    @property
    def name(self) -> str:
        """Stable, filesystem-safe part name, so a re-run maps a unit to the same directory."""
        base = os.path.basename(self.path.rstrip("/")) or "root"
        if self.kind == "folder":
            base = f"{base}-{_stable_hash(self.files)}"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{self.kind}-{base}")


def _stable_hash(items: tuple[str, ...]) -> str:
    import hashlib
    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:10]


def discover_units(inputs: list[str]) -> list[Unit]:
    """Expand globs and directories into units, in a deterministic order; errors name the input."""
    units: list[Unit] = []
    for spec in inputs:
        matches = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
        if not matches:
            raise FileNotFoundError(f"--input {spec!r}: the glob matches no file")
        for path in matches:
            if os.path.isdir(path):
                files = sorted(os.path.relpath(os.path.join(d, f), path)
                               for d, _, fs in os.walk(path) for f in fs
                               if f.lower().endswith(IMAGE_EXTS))
                if not files:
                    raise ValueError(f"--input {path!r}: folder holds no image ({', '.join(IMAGE_EXTS)})")
                units += [Unit("folder", path, tuple(files[i:i + FOLDER_CHUNK]))
                          for i in range(0, len(files), FOLDER_CHUNK)]
            elif not os.path.exists(path):
                raise FileNotFoundError(f"--input {path!r}: no such file or folder")
            elif path.endswith(".tar"):
                units.append(Unit("tar", path))
            elif path.lower().endswith(TABLE_EXTS):
                units.append(Unit("table", path))
            else:
                raise ValueError(f"--input {path!r}: unknown input kind; expected a .tar, .parquet, "
                                 f".csv or an image folder")
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"--input: several inputs share the part name(s) {dup}; rename the files")
    return units


def read_unit(unit: Unit, label_column: str | None = None) -> Iterator[RawSample]:
    """Yield the unit's samples in file order; a table's ``label_column`` goes to ``extra["label"]``."""
    if unit.kind == "tar":
        yield from _read_tar(unit.path)
    elif unit.kind == "table":
        yield from _read_table(unit.path, label_column)
    else:
        yield from _read_folder(unit.path, unit.files)


def _parse_meta(sample: RawSample, payload: bytes) -> None:
    try:
        meta = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        sample.meta_error = f"sidecar JSON: {e}"
        return
    if not isinstance(meta, dict):
        sample.meta_error = "sidecar JSON is not an object"
        return
    for name in ("synthetic", "generated"):
        if isinstance(meta.get(name), str):
            setattr(sample, name, meta[name])
    if "tags" in meta:
        sample.tags = meta["tags"]
    for name in ("width", "height"):
        if isinstance(meta.get(name), int):
            sample.extra[name] = meta[name]
    if isinstance(meta.get("url"), str):
        sample.extra["source"] = meta["url"]


def _read_tar(path: str) -> Iterator[RawSample]:
    """img2dataset layout: members ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` next to each other."""
    current: RawSample | None = None
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            # webdataset convention: the key is everything before the first dot of the basename.
            stem, _, ext = base.partition(".")
            key = os.path.join(os.path.dirname(member.name), stem)
            if current is None or current.key != key:
                if current is not None:
                    yield current
                current = RawSample(key=key, source=path)
            data = tar.extractfile(member).read()
            ext = "." + ext.lower()
            if ext in IMAGE_EXTS:
                current.image = data
            elif ext == ".txt":
                current.raw = data
            elif ext == ".json":
                _parse_meta(current, data)
    if current is not None:
        yield current


def _pick(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _read_table(path: str, label_column: str | None = None) -> Iterator[RawSample]:
    import pandas as pd
    if path.lower().endswith(".csv"):
        # surrogateescape keeps invalid UTF-8 bytes recoverable, so a bad cell is rejected on its own
        # (in builder.py) instead of failing the whole file; keep "" rather than NaN.
        df = pd.read_csv(path, dtype=object, keep_default_na=False, encoding="utf-8",
                         encoding_errors="surrogateescape")
    else:
        df = pd.read_parquet(path)
    cols = list(df.columns)
    img_bytes_col = _pick(cols, IMAGE_BYTES_COLUMNS)
    img_path_col = _pick(cols, IMAGE_PATH_COLUMNS)
    raw_col = _pick(cols, RAW_COLUMNS)
    # A labelled table may lack texts: its samples then take their class names (labels.py).
    if (img_bytes_col is None and img_path_col is None) or (raw_col is None and label_column is None):
        raise ValueError(f"{path}: table needs an image column (bytes: {IMAGE_BYTES_COLUMNS} or path: "
                         f"{IMAGE_PATH_COLUMNS}) and a text column {RAW_COLUMNS}; it has {cols}")
    if label_column is not None and label_column not in cols:
        raise ValueError(f"{path}: --labels {label_column!r}: no such column; the table has {cols}")
    key_col = _pick(cols, KEY_COLUMNS)
    root = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    for i, row in enumerate(df.to_dict("records")):
        key = str(row[key_col]) if key_col else f"{stem}-{i:09d}"
        s = RawSample(key=key, source=f"{path}:row{i}")
        if img_bytes_col is not None and isinstance(row[img_bytes_col], (bytes, bytearray)):
            s.image = bytes(row[img_bytes_col])
        elif img_path_col is not None and row[img_path_col]:
            img_path = os.path.join(root, str(row[img_path_col]))
            try:
                with open(img_path, "rb") as f:
                    s.image = f.read()
            except OSError as e:
                s.image_error = f"missing_file: {img_path}: {e.strerror}"
        raw = row[raw_col] if raw_col else None
        s.raw = raw if isinstance(raw, bytes) else (
            None if raw is None else str(raw).encode("utf-8", "surrogateescape"))
        for name in ("synthetic", "generated"):
            if name in cols and isinstance(row[name], (str, bytes)):
                setattr(s, name, row[name])
        if label_column is not None:
            s.extra["label"] = row[label_column]
        if "tags" in cols and row["tags"] is not None:
            tags = row["tags"]
            if isinstance(tags, str):
                try:
                    tags = json.loads(tags) if tags else []
                except json.JSONDecodeError as e:
                    s.meta_error = f"tags column: {e}"
            s.tags = list(tags) if not isinstance(tags, (str, dict)) and hasattr(tags, "__iter__") else tags
        yield s


def _read_folder(root: str, files: tuple[str, ...]) -> Iterator[RawSample]:
    """Each image ``a/b.jpg`` with its caption in ``a/b.txt`` and optional metadata in ``a/b.json``."""
    for rel in files:
        stem = os.path.splitext(rel)[0]
        s = RawSample(key=stem, source=os.path.join(root, rel))
        with open(os.path.join(root, rel), "rb") as f:
            s.image = f.read()
        txt = os.path.join(root, stem + ".txt")
        if os.path.exists(txt):
            with open(txt, "rb") as f:
                s.raw = f.read()
        meta = os.path.join(root, stem + ".json")
        if os.path.exists(meta):
            with open(meta, "rb") as f:
                _parse_meta(s, f.read())
        yield s
