"""The ``label`` column of labelled evaluation sets (``make_shards.py --labels folder|COLUMN``).

- ``folder``: image-folder inputs laid out ImageNet-style, one subfolder per class; the label is the
  subfolder's index among the input folder's subfolders in sorted order (torchvision's ImageFolder
  rule, so ``tools/evaluate.py`` gives the same labels for the folder and its shards), or its line in
  the ``--classes`` file.
- ``COLUMN``: a column of CSV/parquet inputs holding class indices, or class names of ``--classes``.

A label that cannot be resolved is an error naming the file (and row), never a skipped sample: a
silently missing class would bias the evaluation. A labelled sample without raw text gets its class
name as raw text (ImageNet folders have no captions).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from dataclasses import dataclass

from rwkvclip_dist.data.class_list import read_class_list
from rwkvclip_dist.data.shards.sources import RawSample, Unit


class LabelError(ValueError):
    """A label option or value that cannot be used; the message names the file and row or folder."""


@dataclass(frozen=True)
class LabelOptions:
    """``source``: ``"folder"`` or a table column name; ``classes``: optional class-list file."""

    source: str
    classes: str | None = None

    def fingerprint(self) -> str:
        digest = ""
        if self.classes is not None:
            with open(self.classes, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
        return f"{self.source}:{digest}"


def read_classes(path: str) -> list[str]:
    """The ``--classes`` file, read by the one class-list reader (data/class_list.py)."""
    return read_class_list(path, "--classes")


class Labeller:
    """Resolves each sample's label; checks the options against the inputs before anything is built."""

    def __init__(self, opts: LabelOptions, units: list[Unit]) -> None:
        self.opts = opts
        self.classes = read_classes(opts.classes) if opts.classes else None
        self.class_index = {c: i for i, c in enumerate(self.classes or ())}
        self.by_root: dict[str, dict[str, int]] = {}
        folder_mode = opts.source == "folder"
        for u in units:
            if folder_mode and u.kind != "folder":
                raise LabelError(f"--labels folder needs image-folder inputs; {u.path} is a {u.kind}")
            if not folder_mode and u.kind != "table":
                raise LabelError(f"--labels {opts.source!r} reads a CSV/parquet column; {u.path} is a {u.kind}")
            if folder_mode:
                self._check_folder(u)

    def _check_folder(self, u: Unit) -> None:
        if u.path not in self.by_root:
            names = self.classes or sorted(e.name for e in os.scandir(u.path) if e.is_dir())
            self.by_root[u.path] = {c: i for i, c in enumerate(names)}
        index = self.by_root[u.path]
        for rel in u.files:
            cls, sep, _ = rel.partition(os.sep)
            if not sep:
                raise LabelError(f"{os.path.join(u.path, rel)}: --labels folder needs every image inside "
                                 f"a class subfolder")
            if cls not in index:
                raise LabelError(f"{os.path.join(u.path, cls)}: class folder {cls!r} is not in --classes "
                                 f"{self.opts.classes}")

    def label(self, unit: Unit, s: RawSample) -> tuple[int, str | None]:
        """(label, class name or None) of a sample read from ``unit``."""
        if self.opts.source == "folder":
            cls = s.key.split("/", 1)[0]
            return self.by_root[unit.path][cls], cls
        value = s.extra.get("label")
        label = self._from_value(value)
        if label is None:
            known = f" or a class name of --classes {self.opts.classes}" if self.classes else ""
            raise LabelError(f"{s.source}: label {value!r} in column {self.opts.source!r} is not a class "
                             f"index (a non-negative integer{known})")
        if self.classes is not None and label >= len(self.classes):
            raise LabelError(f"{s.source}: label {label} in column {self.opts.source!r} is out of range: "
                             f"--classes {self.opts.classes} has {len(self.classes)} classes")
        return label, self.classes[label] if self.classes else None

    def _from_value(self, value) -> int | None:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            value = value.strip()
            if value in self.class_index:
                return self.class_index[value]
            return int(value) if value.isdigit() else None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        if isinstance(value, numbers.Integral):
            return int(value) if value >= 0 else None
        return int(value) if math.isfinite(value) and float(value).is_integer() and value >= 0 else None
