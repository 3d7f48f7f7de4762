"""Labelled image data sets for evaluation: image folders and labelled MDS shard directories.

``open_labelled_images(path, transform)`` picks the reader: a directory with ``index.json`` is read
as MDS shards with ``jpg`` and ``label`` columns (the demo digits' held-out split), anything else
as a torchvision ImageFolder (one sub-folder per class, classes in sorted order).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder


class MDSLabelledImages(Dataset):
    """Random-access ``(image, label)`` pairs from local MDS shards."""

    def __init__(self, path: str | Path, transform) -> None:
        from streaming import LocalDataset

        self.path, self.transform = Path(path), transform
        self._cache = tempfile.TemporaryDirectory(prefix="rwkvclip-eval-mds-")
        self.data = LocalDataset(_decompressed_copy(self.path, Path(self._cache.name)))
        columns = set(self.data.shards[0].column_names) if self.data.shards else set()
        if not {"jpg", "label"} <= columns:
            raise ValueError(f"{self.path}: MDS shards need 'jpg' and 'label' columns, found {sorted(columns)}")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        sample = self.data[index]
        try:
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        except OSError as err:
            raise ValueError(f"{self.path}: sample {index} ({sample.get('key', '?')}) has an unreadable image") from err
        return self.transform(image), int(sample["label"])


def _decompressed_copy(src: Path, dst: Path) -> str:
    """Raw shards of ``src`` under ``dst`` (LocalDataset reads only uncompressed shards)."""
    from streaming.base.compression import decompress

    index = json.loads((src / "index.json").read_text())
    for shard in index["shards"]:
        raw, packed = shard["raw_data"]["basename"], shard.get("zip_data")
        (dst / raw).parent.mkdir(parents=True, exist_ok=True)  # merged indexes name part sub-folders
        if packed:
            data = decompress(shard["compression"], (src / packed["basename"]).read_bytes())
            (dst / raw).parent.mkdir(parents=True, exist_ok=True)
            (dst / raw).write_bytes(data)
        else:
            (dst / raw).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / raw, dst / raw)
    (dst / "index.json").write_text(json.dumps(index))
    return str(dst)


def open_labelled_images(path: str | Path, transform) -> tuple[Dataset, list[str] | None]:
    """``(dataset, folder class names or None)``; MDS shards carry no class names."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation data {path} is not a directory")
    if (path / "index.json").is_file():
        return MDSLabelledImages(path, transform), None
    folder = ImageFolder(str(path), transform=transform)
    return folder, [c.replace("_", " ") for c in folder.classes]
