"""Labelled image data sets for evaluation: image folders and labelled MDS shard directories.

``open_labelled_images(path, transform)`` picks the reader: a directory with ``index.json`` is read
as MDS shards with ``jpg`` and ``label`` columns (the demo digits' held-out split), anything else
as a torchvision ImageFolder (one sub-folder per class, classes in sorted order).
"""

from __future__ import annotations

import bisect
import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

log = logging.getLogger(__name__)


class MDSLabelledImages(Dataset):
    """Random-access ``(image, label)`` pairs read from local MDS shards where they lie.

    Nothing is written: a compressed shard is decompressed in memory when one of its samples is
    read and kept until a sample of another shard is asked for. Evaluation reads in order, so each
    reading process decompresses a shard once and holds at most one (a copy on disk would be the
    whole set, per process and per evaluation, and outlive a killed process).
    """

    def __init__(self, path: str | Path, transform) -> None:
        self.path, self.transform = Path(path), transform
        self.shards, ends = [], []
        for obj in json.loads((self.path / "index.json").read_text())["shards"]:
            shard = reader_from_json(str(self.path), None, obj)
            stored = (shard.zip_data or shard.raw_data).basename
            if not (self.path / stored).is_file():
                raise FileNotFoundError(f"{self.path}: index.json names shard file {stored}, which is missing")
            self.shards.append(shard)
            ends.append((ends[-1] if ends else 0) + shard.samples)
        self._ends = ends
        self._held: tuple[int, bytes] | None = None  # (shard, its decompressed bytes)
        columns = set(self.shards[0].column_names) if self.shards else set()
        if not {"jpg", "label"} <= columns:
            raise ValueError(f"{self.path}: MDS shards need 'jpg' and 'label' columns, found {sorted(columns)}")

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_held": None}  # a worker process decompresses its own

    def sample(self, index: int) -> dict:
        """The decoded MDS row ``index`` of the whole set."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: sample {index} of {len(self)}")
        shard_id = bisect.bisect_right(self._ends, index)
        shard, local = self.shards[shard_id], index - (self._ends[shard_id] - self.shards[shard_id].samples)
        if not shard.zip_data:
            return shard.decode_sample(shard.get_sample_data(local))  # raw shard: read in place
        if self._held is None or self._held[0] != shard_id:
            packed = (self.path / shard.zip_data.basename).read_bytes()
            self._held = None  # let the previous shard go before the next one is decompressed
            self._held = (shard_id, decompress(shard.compression, packed))
        data = self._held[1]
        begin, end = np.frombuffer(data, np.uint32, count=2, offset=(1 + local) * 4)
        return shard.decode_sample(data[begin:end])

    def __getitem__(self, index: int):
        sample = self.sample(index)
        try:
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        except OSError as err:
            raise ValueError(f"{self.path}: sample {index} ({sample.get('key', '?')}) has an unreadable image") from err
        return self.transform(image), int(sample["label"])


class SkipUnreadable(Dataset):
    """``(image, label, readable)`` of ``dataset``: an image that cannot be decoded (a corrupt or
    non-image file among good ones) becomes a blank stand-in with ``readable`` 0, which
    :func:`~rwkvclip_dist.eval.features.image_features` leaves out and counts, instead of one bad file
    ending the evaluation."""

    def __init__(self, dataset: Dataset, transform, name: str) -> None:
        self.dataset, self.transform, self.name = dataset, transform, name

    def __len__(self) -> int:
        return len(self.dataset)

    def labels(self) -> list[int]:
        """Every sample's label, without decoding an image."""
        if isinstance(self.dataset, ImageFolder):
            return list(self.dataset.targets)
        return [int(self.dataset.sample(i)["label"]) for i in range(len(self.dataset))]

    def __getitem__(self, index: int):
        try:
            image, label = self.dataset[index]
            return image, label, 1
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            label = self.dataset.targets[index] if isinstance(self.dataset, ImageFolder) else -1
            log.warning("%s: sample %d: unreadable image, left out (%s)", self.name, index, err)
            return self.transform(Image.new("RGB", (32, 32))), label, 0


def open_labelled_images(path: str | Path, transform) -> tuple[SkipUnreadable, list[str] | None]:
    """``(dataset, folder class names or None)``; MDS shards carry no class names."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation data {path} is not a directory")
    if (path / "index.json").is_file():
        return SkipUnreadable(MDSLabelledImages(path, transform), transform, str(path)), None
    folder = ImageFolder(str(path), transform=transform)
    return SkipUnreadable(folder, transform, str(path)), [c.replace("_", " ") for c in folder.classes]
