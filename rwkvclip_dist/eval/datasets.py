"""Labelled image data sets for evaluation: image folders and labelled MDS shard directories.

``open_labelled_images(path, transform)`` picks the reader: a directory with ``index.json`` is read
as MDS shards with ``jpg`` and ``label`` columns (the demo digits' held-out split), anything else
as a torchvision ImageFolder (one sub-folder per class, classes in sorted order).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from rwkvclip_dist.data.mds_in_place import LocalShards

log = logging.getLogger(__name__)


class MDSLabelledImages(Dataset):
    """Random-access ``(image, label)`` pairs read from local MDS shards where they lie
    (``data/mds_in_place.py``: nothing is written, a compressed shard is decompressed in memory)."""

    def __init__(self, path: str | Path, transform) -> None:
        self.path, self.transform = Path(path), transform
        self._shards = LocalShards(self.path)
        columns = set(self.shards[0].column_names) if self.shards else set()
        if not {"jpg", "label"} <= columns:
            raise ValueError(f"{self.path}: MDS shards need 'jpg' and 'label' columns, found {sorted(columns)}")

    @property
    def shards(self) -> list:
        return self._shards.shards

    def __len__(self) -> int:
        return len(self._shards)

    def sample(self, index: int) -> dict:
        """The decoded MDS row ``index`` of the whole set."""
        return self._shards.sample(index)

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
        if isinstance(self.dataset, MDSLabelledImages):
            return [int(self.dataset.sample(i)["label"]) for i in range(len(self.dataset))]
        return list(self.dataset.targets)

    def __getitem__(self, index: int):
        try:
            image, label = self.dataset[index]
            return image, label, 1
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            label = -1 if isinstance(self.dataset, MDSLabelledImages) else self.dataset.targets[index]
            log.warning("%s: sample %d: unreadable image, left out (%s)", self.name, index, err)
            return self.transform(Image.new("RGB", (32, 32))), label, 0


def open_labelled_images(path: str | Path, transform) -> tuple[SkipUnreadable, list[str] | None]:
    """``(dataset, folder class names or None)``; MDS shards carry no class names."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation data {path} is not a directory")
    if (path / "index.json").is_file():
        return SkipUnreadable(MDSLabelledImages(path, transform), transform, str(path)), None
    # Here, not at the top: torchvision.datasets imports every data set's module (~1.4 s of CPU), which
    # every training rank would pay through the in-loop evaluation's imports, for folders few runs read.
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(path), transform=transform)
    return SkipUnreadable(folder, transform, str(path)), [c.replace("_", " ") for c in folder.classes]
