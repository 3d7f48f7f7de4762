"""Small evaluation sets in CLIP_benchmark's published webdataset layout, made by the tests.

Written with webdataset's own ``TarWriter`` (the writer behind ``clip_benchmark_export_wds``), so
the member names and encodings are the published ones: key ``s%07d``, lossless ``webp`` images,
``cls`` the label as text, ``npy`` a numpy array of metadata, ``txt`` captions one a line, and
``nshards.txt``, ``classnames.txt``, ``zeroshot_classification_templates.txt`` and
``dataset_type.txt`` beside the split folders.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

WORDS = ["apple", "boat", "cloud", "dog", "engine", "forest", "guitar", "house", "island", "jacket", "kite", "lamp"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "art of a {c}."]


def picture(seed: int, size: int = 40) -> Image.Image:
    """A deterministic picture: a colour field with a block whose place depends on the seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (size, size, 3)) + rng.integers(0, 190, (1, 1, 3))
    x, y = rng.integers(0, size - 12, 2)
    pixels[y : y + 12, x : x + 12] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def natural_picture(seed: int, size: int = 192) -> Image.Image:
    """A photo-like picture: smooth colour waves and a few discs (the low-frequency structure a
    perceptual hash reads); pictures of different seeds are unrelated."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for _ in range(6):
        fx, fy = rng.uniform(0.5, 6, 2)
        img += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 6.3))[..., None] * rng.uniform(-1, 1, 3)
    for _ in range(4):
        cx, cy, radius = rng.uniform(0, 1, 3)
        img[(x - cx) ** 2 + (y - cy) ** 2 < (0.3 * radius) ** 2] += rng.uniform(-1.5, 1.5, 3)
    img = (img - img.min()) / (img.max() - img.min() + 1e-9) * 255
    return Image.fromarray(img.astype(np.uint8))


def webp(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="webp", lossless=True)
    return out.getvalue()


def _write_split(root: Path, split: str, samples: list[dict], nshards: int) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    per = -(-len(samples) // nshards)
    for shard in range(nshards):
        with wds.TarWriter(str(root / split / f"{shard}.tar")) as sink:
            for sample in samples[shard * per : (shard + 1) * per]:
                sink.write(sample)
    (root / split / "nshards.txt").write_text(f"{nshards}\n")


def classification_set(root: Path, n: int, n_classes: int, seed: int = 0, split: str = "test", nshards: int = 2,
                       metadata: np.ndarray | None = None, corrupt: tuple[int, ...] = (), templates=True,
                       draw=picture) -> Path:
    """``n`` images of ``n_classes`` classes; ``metadata`` [n, fields] adds ``npy`` members;
    samples listed in ``corrupt`` get image bytes that no decoder reads."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        label = int(rng.integers(0, n_classes))
        image = b"RIFF\x10\x00\x00\x00WEBPVP8 broken" if i in corrupt else webp(draw(seed * 1000 + i))
        sample = {"__key__": f"s{i:07d}", "webp": image, "cls": label}
        if metadata is not None:
            sample["npy"] = metadata[i]
        samples.append(sample)
    _write_split(root, split, samples, nshards)
    (root / "classnames.txt").write_text("\n".join(WORDS[:n_classes]) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def retrieval_set(root: Path, n: int, captions_per_image: int = 5, seed: int = 0, corrupt: tuple[int, ...] = (),
                  draw=picture) -> Path:
    samples = []
    for i in range(n):
        image = b"not an image" if i in corrupt else webp(draw(seed * 1000 + i))
        words = [WORDS[(i + j) % len(WORDS)] for j in range(captions_per_image)]
        samples.append({"__key__": f"s{i:07d}", "webp": image,
                        "txt": "\n".join(f"a {w} next to picture {i}" for w in words)})
    _write_split(root, "test", samples, 1)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def hf_cache_retrieval_set(wds_root: Path, cache_dir: Path, name: str) -> Path:
    """The retrieval set at ``wds_root`` rewritten as a Hugging Face ``datasets`` cache file, the
    way DataComp's download leaves Flickr and MSCOCO: an Arrow stream with an ``image`` struct
    (``bytes``, ``path``) and a ``caption`` list per row (the fields DataComp's retr_eval.py reads)."""
    import tarfile

    import pyarrow as pa

    members = {}
    with tarfile.open(wds_root / "test" / "0.tar") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    rows = [members[k] for k in sorted(members)]
    table = pa.table({"image": [{"bytes": r["webp"], "path": None} for r in rows],
                      "caption": [r["txt"].decode().splitlines() for r in rows]})
    out = cache_dir / f"nlphuji___{name}" / "default" / "0.0.0" / "0123abcd"
    out.mkdir(parents=True)
    with pa.ipc.new_stream(str(out / f"{name}-test.arrow"), table.schema) as writer:
        writer.write_table(table)
    return cache_dir / f"nlphuji___{name}"


def hf_cache_winogavil_set(cache_dir: Path, n_candidates: tuple[int, ...], seed: int = 0,
                           corrupt: tuple[tuple[int, int], ...] = ()) -> Path:
    """WinoGAViL as DataComp's download leaves it (``nlphuji/winogavil``, split test, in
    ``DIR/hf_cache``): an Arrow stream with ``cue``, ``candidates``, ``associations`` and
    ``candidate_images`` (Image structs) per instance. Even rows hold the images' bytes, odd rows a
    path to an extracted file (relative to the dataset folder), the two ways ``datasets`` stores an
    Image; ``corrupt`` lists ``(row, candidate)`` images written as garbage bytes."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    root = cache_dir / "nlphuji___winogavil"
    out = root / "TEST" / "1.1.0" / "0123abcd"
    (root / "extracted").mkdir(parents=True)
    out.mkdir(parents=True)
    rows = {"cue": [], "candidates": [], "associations": [], "candidate_images": []}
    for row, n in enumerate(n_candidates):
        names = [f"{WORDS[i % len(WORDS)]}{i}" for i in rng.permutation(40)[:n]]
        rows["cue"].append(WORDS[int(rng.integers(len(WORDS)))] if row % 3 else "owl")  # "An owl"
        rows["candidates"].append(names)
        rows["associations"].append([str(a) for a in rng.choice(names, int(rng.integers(2, 5)), replace=False)])
        images = []
        for c, name in enumerate(names):
            data = b"not an image" if (row, c) in corrupt else webp(picture(seed * 1000 + row * 20 + c))
            if row % 2:
                (root / "extracted" / f"{row}-{name}.webp").write_bytes(data)
                images.append({"bytes": None, "path": f"extracted/{row}-{name}.webp"})
            else:
                images.append({"bytes": data, "path": None})
        rows["candidate_images"].append(images)
    table = pa.table(rows)
    with pa.ipc.new_stream(str(out / "winogavil-test.arrow"), table.schema) as writer:
        writer.write_table(table)
    return root
