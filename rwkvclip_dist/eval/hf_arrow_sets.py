"""DataComp's retrieval sets as its download step leaves them: Hugging Face ``datasets`` cache files.

``download_evalsets.py`` loads ``nlphuji/flickr_1k_test_image_text_retrieval`` and
``nlphuji/mscoco_2014_5k_test_image_text_retrieval`` into ``DIR/hf_cache``; the test split is stored
as Arrow stream files ``...-test*.arrow`` somewhere under ``DIR/hf_cache/nlphuji___<name>/``, one row
per image with an ``image`` column (a struct holding the encoded ``bytes``, or a ``path``) and a
``caption`` column (the image's captions, a list of strings), the two fields DataComp's
``retr_eval.py`` reads. They are read here with pyarrow, memory-mapped, without the ``datasets``
library. WinoGAViL's cache (rwkvclip_dist/eval/winogavil.py) is read with the same helpers.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset


def arrow_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.arrow") if "-test" in p.name)


def read_test_table(root: Path, columns: tuple[str, ...]) -> pa.Table:
    """The test split's rows from every ``*-test*.arrow`` stream under ``root``, memory-mapped; a
    missing file or column is an error naming it."""
    files = arrow_files(root)
    if not files:
        raise FileNotFoundError(f"{root}: no '*-test*.arrow' file of a Hugging Face dataset cache")
    tables = []
    for path in files:
        try:
            tables.append(pa.ipc.open_stream(pa.memory_map(str(path))).read_all())
        except pa.ArrowInvalid as err:
            raise ValueError(f"{path}: not an Arrow stream file ({err})") from None
    table = pa.concat_tables(tables)
    for column in columns:
        if column not in table.column_names:
            raise ValueError(f"{files[0]}: no {column!r} column (has {table.column_names})")
    return table


def decode_image(entry: dict | None, root: Path):
    """A ``datasets`` Image struct as an RGB picture: its ``bytes``, or the file at its ``path``
    (relative paths from ``root``); None when it cannot be read."""
    try:
        if entry.get("bytes") is not None:
            source = io.BytesIO(entry["bytes"])
        else:
            path = Path(entry["path"])
            source = path if path.is_absolute() else root / path
        with Image.open(source) as img:
            return img.convert("RGB")
    except (OSError, ValueError, TypeError, KeyError, AttributeError, Image.DecompressionBombError):
        return None


class ImageItems(Dataset):
    """``(image, [index, ok])`` items from ``self.image(index)`` (None: unreadable, a blank stands
    in and ``ok`` is 0), the items :func:`rwkvclip_dist.eval.features.image_features` takes."""

    transform: object
    image_size: int

    def image(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        img = self.image(index)
        ok = img is not None
        if not ok:
            img = Image.new("RGB", (self.image_size, self.image_size))
        return self.transform(img), torch.tensor([index, int(ok)], dtype=torch.long)


class ArrowRetrievalSplit(ImageItems):
    """The same interface as :class:`rwkvclip_dist.eval.webdataset_sets.WebDatasetSplit` for a
    retrieval set: ``(image, [index, ok])`` items, ``captions(i)``, ``key(i)``."""

    kind = "retrieval"

    def __init__(self, root: str | Path, transform, image_size: int = 224) -> None:
        self.root, self.transform, self.image_size = Path(root), transform, image_size
        table = read_test_table(self.root, ("image", "caption"))
        self.images, self.caption_lists = table.column("image"), table.column("caption")

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return f"row{index}"

    def captions(self, index: int) -> list[str]:
        return list(self.caption_lists[index].as_py())

    def image(self, index: int):
        return decode_image(self.images[index].as_py(), self.root)
