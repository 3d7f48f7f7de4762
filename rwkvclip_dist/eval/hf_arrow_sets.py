"""DataComp's retrieval sets as its download step leaves them: Hugging Face ``datasets`` cache files.

``download_evalsets.py`` loads ``nlphuji/flickr_1k_test_image_text_retrieval`` and
``nlphuji/mscoco_2014_5k_test_image_text_retrieval`` into ``DIR/hf_cache``; the test split is stored
as Arrow stream files ``...-test*.arrow`` somewhere under ``DIR/hf_cache/nlphuji___<name>/``, one row
per image with an ``image`` column (a struct holding the encoded ``bytes``) and a ``caption`` column
(the image's captions, a list of strings), the two fields DataComp's ``retr_eval.py`` reads. They are
read here with pyarrow, memory-mapped, without the ``datasets`` library.
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


class ArrowRetrievalSplit(Dataset):
    """The same interface as :class:`rwkvclip_dist.eval.webdataset_sets.WebDatasetSplit` for a
    retrieval set: ``(image, [index, ok])`` items, ``captions(i)``, ``key(i)``."""

    kind = "retrieval"

    def __init__(self, root: str | Path, transform, image_size: int = 224) -> None:
        self.root, self.transform, self.image_size = Path(root), transform, image_size
        files = arrow_files(self.root)
        if not files:
            raise FileNotFoundError(f"{self.root}: no '*-test*.arrow' file of a Hugging Face dataset cache")
        tables = []
        for path in files:
            try:
                tables.append(pa.ipc.open_stream(pa.memory_map(str(path))).read_all())
            except pa.ArrowInvalid as err:
                raise ValueError(f"{path}: not an Arrow stream file ({err})") from None
        table = pa.concat_tables(tables)
        for column in ("image", "caption"):
            if column not in table.column_names:
                raise ValueError(f"{files[0]}: no {column!r} column (has {table.column_names})")
        self.images, self.caption_lists = table.column("image"), table.column("caption")

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return f"row{index}"

    def captions(self, index: int) -> list[str]:
        return list(self.caption_lists[index].as_py())

    def image(self, index: int):
        data = self.images[index].as_py()
        try:
            with Image.open(io.BytesIO(data["bytes"])) as img:
                return img.convert("RGB")
        except (OSError, ValueError, TypeError, KeyError, Image.DecompressionBombError):
            return None

    def __getitem__(self, index: int):
        img = self.image(index)
        ok = img is not None
        if not ok:
            img = Image.new("RGB", (self.image_size, self.image_size))
        return self.transform(img), torch.tensor([index, int(ok)], dtype=torch.long)
