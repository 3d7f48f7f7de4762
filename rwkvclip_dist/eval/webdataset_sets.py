"""CLIP_benchmark's webdataset layout, read in place (no conversion): what DataComp downloads.

    <task dir>/
        classnames.txt                           one class name a line, in label order
        zeroshot_classification_templates.txt    one template a line, "{c}" for the class
        dataset_type.txt                         optional: "retrieval" (else classification)
        test/nshards.txt, test/0.tar, test/1.tar ...   (train/ likewise, for linear probes)

Inside a tar, the members of one sample share a key: the member name up to the first dot of its
base name (``s0000042.webp``, ``s0000042.cls``). A classification sample has an image (``webp``,
``png``, ``jpg`` or ``jpeg``) and ``cls`` (the label as text); WILDS and fairness sets add ``npy``
(a numpy array of integer metadata: region, year, income group ...); a retrieval sample has an image
and ``txt`` (its captions, one a line).

The tars are indexed once (member offsets) so that the set is a map-style dataset that ranks can
shard like any other. A corrupt or missing image does not stop the evaluation: the sample comes
back as a blank image flagged not ``ok``, the scorer leaves it out and reports its key and count.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rwkvclip_dist.data.class_list import read_class_list

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


def read_lines(path: Path, what: str) -> list[str]:
    """The stripped lines of a templates file; a blank line inside it is refused rather than skipped.
    (Class names go through the one class-list reader, ``data.class_list``.)"""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: the {what} file is empty")
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if blank:
        raise ValueError(f"{path}: blank line(s) {blank[:5]} in the {what} file")
    return lines


def shard_files(split_dir: Path) -> list[Path]:
    """The split's tars: ``0.tar`` .. ``n-1.tar`` when ``nshards.txt`` says n, else every ``*.tar``
    in natural order. A tar that ``nshards.txt`` promises but is absent is an error."""
    count_file = split_dir / "nshards.txt"
    if count_file.is_file():
        text = count_file.read_text().strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{count_file}: expected a positive shard count, got {text!r}")
        tars = [split_dir / f"{i}.tar" for i in range(int(text))]
        absent = [str(t) for t in tars if not t.is_file()]
        if absent:
            raise FileNotFoundError(f"{count_file} lists {len(tars)} shards but {absent[:3]} are missing")
        return tars
    tars = sorted(split_dir.glob("*.tar"), key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    if not tars:
        raise FileNotFoundError(f"{split_dir}: no .tar files")
    return tars


@dataclass
class Member:
    tar: int
    offset: int
    size: int


def index_tars(tars: list[Path]) -> list[tuple[str, dict[str, Member]]]:
    """``[(key, {extension: member})]`` in the order the samples appear in the tars."""
    samples: dict[str, dict[str, Member]] = {}
    for t, path in enumerate(tars):
        try:
            with tarfile.open(path, mode="r:") as archive:
                for info in archive:
                    if not info.isfile():
                        continue
                    folder, _, base = info.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot:
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    samples.setdefault(key, {})[ext.lower()] = Member(t, info.offset_data, info.size)
        except (tarfile.TarError, OSError) as err:
            raise ValueError(f"{path}: not a readable tar ({err})") from None
    return list(samples.items())


class WebDatasetSplit(Dataset):
    """One split of a task directory. ``__getitem__`` gives ``(image, target)`` where ``target`` is
    a long tensor ``[value, ok, *metadata]``: ``value`` is the label (classification) or the
    sample's index (retrieval), ``ok`` is 0 for an image that could not be decoded."""

    def __init__(self, root: str | Path, split: str, transform, image_size: int = 224) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        self.tars = shard_files(self.root / split)
        self.samples = index_tars(self.tars)
        if not self.samples:
            raise ValueError(f"{self.root / split}: the tars hold no samples")
        type_file = self.root / "dataset_type.txt"
        self.kind = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
        self.meta_len = len(self._metadata(0)) if "npy" in self.samples[0][1] else 0
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, index: int) -> str:
        return self.samples[index][0]

    def _read(self, member: Member) -> bytes:
        with open(self.tars[member.tar], "rb") as f:
            f.seek(member.offset)
            return f.read(member.size)

    def _field(self, index: int, ext: str) -> bytes:
        key, members = self.samples[index]
        if ext not in members:
            raise ValueError(f"{self.root / self.split}: sample {key!r} has no .{ext} member "
                             f"(it has {sorted(members)})")
        return self._read(members[ext])

    def label(self, index: int) -> int:
        text = self._field(index, "cls").decode().strip()
        if not text.lstrip("-").isdigit():
            raise ValueError(f"{self.root / self.split}: sample {self.key(index)!r}: .cls holds {text!r}, not an integer")
        return int(text)

    def captions(self, index: int) -> list[str]:
        return self._field(index, "txt").decode("utf-8").splitlines()

    def _metadata(self, index: int) -> list[int]:
        array = np.load(io.BytesIO(self._field(index, "npy")), allow_pickle=False)
        return [int(v) for v in np.asarray(array).reshape(-1)]

    def image(self, index: int):
        """The decoded RGB image, or None when the sample's image is missing or corrupt."""
        members = self.samples[index][1]
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            return None
        try:
            with Image.open(io.BytesIO(self._read(members[ext]))) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            return None

    def __getitem__(self, index: int):
        img = self.image(index)
        ok = img is not None
        if not ok:  # a stand-in the scorer discards; its shape keeps the batch collatable
            img = Image.new("RGB", (self.image_size, self.image_size))
        value = index if self.kind == "retrieval" else self.label(index)
        meta = self._metadata(index) if self.meta_len else []
        return self.transform(img), torch.tensor([value, int(ok), *meta], dtype=torch.long)


@dataclass
class TaskData:
    """A task directory's metadata: what a zero-shot classifier needs."""

    root: Path
    classnames: list[str] | None
    templates: list[str] | None


def open_task_dir(root: str | Path, need_prompts: bool) -> TaskData:
    """Reads ``classnames.txt`` and ``zeroshot_classification_templates.txt`` of a task directory;
    with ``need_prompts`` both must exist (a zero-shot task cannot be scored without them)."""
    root = Path(root)
    files = {"classnames": root / "classnames.txt", "templates": root / "zeroshot_classification_templates.txt"}
    read = {"classnames": read_class_list(str(files["classnames"]), "classnames.txt", published=True)
            if files["classnames"].is_file() else None,
            "templates": read_lines(files["templates"], "templates") if files["templates"].is_file() else None}
    if need_prompts:
        for what, path in files.items():
            if read[what] is None:
                raise FileNotFoundError(f"{path}: missing; a zero-shot task needs its {what} file beside test/")
    return TaskData(root, read["classnames"], read["templates"])
