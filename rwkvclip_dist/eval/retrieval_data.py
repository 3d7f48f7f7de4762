"""Caption annotations for retrieval: COCO-caption, Karpathy-split and flat JSON layouts.

Accepted files (the layout is detected from the JSON itself):
- COCO captions: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``;
- Karpathy splits (``dataset_coco.json`` / ``dataset_flickr30k.json``): ``{"images": [{"filename",
  "filepath"?, "split", "sentences": [{"raw"}]}]}``, filtered by ``split``;
- flat: ``[{"image": "path", "caption": "text" | ["text", ...]}]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset


@dataclass
class RetrievalSet:
    image_paths: list[Path]
    """Absolute paths, one per image, in index order."""
    captions: list[str]
    text_to_image: list[int]
    """Index into image_paths of each caption's image."""


def load_retrieval_annotations(
    annotations: str | Path, image_root: str | Path, split: str = "test", caption_prefix: str = ""
) -> RetrievalSet:
    """Parses ``annotations`` and resolves image paths under ``image_root``.

    ``caption_prefix`` (e.g. ``"a photo of "``, as the RWKV-CLIP paper does) is prepended to every
    caption.
    """
    path, root = Path(annotations), Path(image_root)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from None
    if isinstance(data, dict) and "annotations" in data:
        pairs = _coco(data, path)
    elif isinstance(data, dict) and "images" in data:
        pairs = _karpathy(data, path, split)
    elif isinstance(data, list):
        pairs = _flat(data, path)
    else:
        raise ValueError(f"{path}: not a COCO, Karpathy or flat caption file (top level is {type(data).__name__})")
    result = RetrievalSet([], [], [])
    for image, captions in pairs:
        if not captions:
            raise ValueError(f"{path}: image {image!r} has no captions")
        index = len(result.image_paths)
        result.image_paths.append(root / image)
        for caption in captions:
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{path}: image {image!r} has an empty or non-string caption {caption!r}")
            result.captions.append(caption_prefix + caption.strip())
            result.text_to_image.append(index)
    if not result.image_paths:
        raise ValueError(f"{path}: no images found (split {split!r})")
    missing = [str(p) for p in result.image_paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} images missing under {root}, e.g. {missing[:3]}")
    return result


def _coco(data: dict, path: Path) -> list[tuple[str, list[str]]]:
    captions: dict[int, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{path}: annotations[{i}] lacks 'image_id' or 'caption'")
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    pairs = []
    for i, image in enumerate(data["images"]):
        if "id" not in image or "file_name" not in image:
            raise ValueError(f"{path}: images[{i}] lacks 'id' or 'file_name'")
        pairs.append((image["file_name"], captions.get(image["id"], [])))
    return pairs


def _karpathy(data: dict, path: Path, split: str) -> list[tuple[str, list[str]]]:
    pairs = []
    for i, image in enumerate(data["images"]):
        if "filename" not in image or "sentences" not in image:
            raise ValueError(f"{path}: images[{i}] lacks 'filename' or 'sentences'")
        if image.get("split", split) != split:
            continue
        name = str(Path(image.get("filepath", "")) / image["filename"])
        pairs.append((name, [s["raw"] for s in image["sentences"]]))
    return pairs


def _flat(data: list, path: Path) -> list[tuple[str, list[str]]]:
    pairs = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "image" not in item or "caption" not in item:
            raise ValueError(f"{path}: entry {i} lacks 'image' or 'caption'")
        caption = item["caption"]
        pairs.append((item["image"], [caption] if isinstance(caption, str) else list(caption)))
    return pairs


class ImageListDataset(Dataset):
    """Images from a list of paths with a transform; the label is the index (for feature order)."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), index
