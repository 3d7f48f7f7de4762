"""Keep evaluation images (and optionally captions) out of the training shards.

Every evaluation image of a suite's layouts (``rwkvclip_dist.eval.suite``: the ``wds_*`` folders
under an evaluation data directory) gets a 64-bit perceptual hash: the signs, against their median,
of the 8x8 lowest frequencies of the 2-D DCT of a 32x32 grey version of the image. Resizing and
re-encoding move few of those bits, unrelated images differ in about half of them; a crop of a few
per cent moves many (12 of 64 on average for 4% off every side), so each evaluation image is hashed
whole and as 36 crops (98%, 95%, 92% and 89% of each side, at 9 places: corners, edge middles,
centre), and a slightly cropped training copy lands near one of them. A training image (one hash)
matches when it is within ``max_distance`` bits of any of an evaluation image's 37 hashes.

The hashes live on disk (:class:`HashIndex`, numpy files opened with ``mmap``), indexed for
Hamming-radius search by multi-index hashing: the 64 bits are cut into 4 bands of 16 bits; two
hashes within 7 bits of each other agree within 1 bit on at least one band (4 bands x 2 > 7), so
a query probes, per band, its own band value and its 16 one-bit neighbours in a table sorted by
band value (CSR offsets), and checks the few candidates' full distance: ~70 table slots and ~1/900
of the hashes instead of all of them (benchmarks/decontam.md has the measured cost and size).

Caption overlap (optional): the word n-grams of the evaluation captions (retrieval sets) are
hashed into a sorted array; a training text sharing any n-gram with them matches.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn

from rwkvclip_dist.data.shards.validate import Rejected

BANDS, BAND_BITS = 4, 16
CROP_SCALES, CROP_PLACES = (0.98, 0.95, 0.92, 0.89), (0.0, 0.5, 1.0)
VARIANTS = 1 + len(CROP_SCALES) * len(CROP_PLACES) ** 2  # hashes per evaluation image
MAX_SUPPORTED_DISTANCE = 7  # what 4 bands probed at radius 1 guarantee to find
_FLIPS = np.array([0] + [1 << b for b in range(BAND_BITS)], dtype=np.uint64)


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash of ``image`` (any mode, any size)."""
    if image.format == "JPEG":  # decode at 1/8 scale straight from the DCT coefficients: 5-10x faster
        image.draft("L", (64, 64))
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    low = dctn(grey, type=2, norm="ortho")[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])  # the DC term only says how bright the image is
    return int(np.packbits(bits).view(">u8")[0])


def phash_bytes(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        return phash(image)


def eval_hashes(data: bytes) -> list[int]:
    """The ``VARIANTS`` hashes of one evaluation image: whole, then each crop."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
    w, h = image.size
    out = [phash(image)]
    for scale in CROP_SCALES:
        cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
        for fy in CROP_PLACES:
            for fx in CROP_PLACES:
                x0, y0 = round((w - cw) * fx), round((h - ch) * fy)
                out.append(phash(image.crop((x0, y0, x0 + cw, y0 + ch))))
    return out


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Hashes of the word n-grams of ``text`` (lower-cased, punctuation dropped) as uint64."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    return np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams],
                    dtype=np.uint64)


@dataclass
class Match:
    task: str
    item: str
    what: str
    """'image' (``distance`` bits apart) or 'caption' (a shared n-gram)."""
    distance: int = 0

    def detail(self) -> str:
        how = f"perceptual-hash distance {self.distance}" if self.what == "image" else "a shared caption n-gram"
        return f"{self.what} matches evaluation task {self.task} item {self.item} ({how})"


class HashIndex:
    """An on-disk index of evaluation hashes (``build_index`` writes it; opening maps it)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.root}: not a decontamination index (no manifest.json)")
        self.manifest = json.loads(manifest.read_text())
        # Plain arrays over the mapped files: indexing a np.memmap costs more per call.
        load = lambda name: np.asarray(np.load(self.root / f"{name}.npy", mmap_mode="r"))  # noqa: E731
        self.hashes, self.items = load("hashes"), load("items")  # VARIANTS hashes per item row
        self.band_rows = [load(f"band{b}_rows") for b in range(BANDS)]
        self.band_hashes = [load(f"band{b}_hashes") for b in range(BANDS)]  # hashes in band order
        self.band_offsets = [load(f"band{b}_offsets") for b in range(BANDS)]
        self.ngrams, self.ngram_items = load("ngrams"), load("ngram_items")
        self.tasks: list[str] = self.manifest["tasks"]
        self.keys: list[str] = (self.root / "keys.txt").read_text().splitlines()

    def item(self, item: int) -> tuple[str, str]:
        """``(task key, item key)`` of item row ``item`` (an image, or a caption after the images)."""
        return self.tasks[int(self.items[item])], self.keys[item]

    def nearest(self, h: int, max_distance: int) -> tuple[int, int] | None:
        """``(item row, distance)`` of the closest evaluation image within ``max_distance``, else None."""
        if not 0 <= max_distance <= MAX_SUPPORTED_DISTANCE:
            raise ValueError(f"max_distance must be in 0..{MAX_SUPPORTED_DISTANCE}, got {max_distance}")
        h = np.uint64(h)
        best_row, best = -1, max_distance + 1
        for b in range(BANDS):
            probes = (((h >> np.uint64(b * BAND_BITS)) & np.uint64(0xFFFF)) ^ _FLIPS).astype(np.int64)
            starts, stops = self.band_offsets[b][probes], self.band_offsets[b][probes + 1]
            lengths = stops - starts
            total = int(lengths.sum())
            if total:  # all probed slices at once: position i of slice j is starts[j] + i
                at = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
                dist = _popcount(self.band_hashes[b][at] ^ h)  # short contiguous runs: few pages read
                i = int(dist.argmin())
                if dist[i] < best:
                    best_row, best = int(self.band_rows[b][at[i]]), int(dist[i])
        return (best_row // VARIANTS, best) if best_row >= 0 else None

    def caption_match(self, text: str, n: int) -> int | None:
        """Item row of an evaluation caption sharing an n-gram with ``text``, else None."""
        if len(self.ngrams) == 0 or n != self.manifest["ngram"]:
            return None
        grams = ngram_hashes(text, n)
        pos = np.searchsorted(self.ngrams, grams)
        pos = np.minimum(pos, len(self.ngrams) - 1)
        hit = np.nonzero(self.ngrams[pos] == grams)[0]
        return int(self.ngram_items[pos[hit[0]]]) if len(hit) else None


def write_index(out: str | Path, tasks: list[str], items: list[tuple[int, str]], hashes: np.ndarray,
                captions: list[tuple[int, str, str]], ngram: int) -> Path:
    """Writes an index to ``out`` (built beside it, then renamed into place): evaluation images
    ``items`` ``(task id, item key)`` with their ``hashes`` ``[len(items), VARIANTS]``, and
    evaluation ``captions`` ``(task id, item key, text)`` whose word ``ngram``-grams are kept."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: exists; a decontamination index is never overwritten")
    hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
    if len(hashes) != len(items) * VARIANTS:
        raise ValueError(f"{len(hashes)} hashes for {len(items)} images, expected {VARIANTS} each")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "hashes.npy", hashes)
    np.save(tmp / "items.npy", np.array([t for t, _ in items] + [t for t, _, _ in captions], dtype=np.int32))
    for b in range(BANDS):
        band = ((hashes >> np.uint64(b * BAND_BITS)) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(band, kind="stable")
        np.save(tmp / f"band{b}_rows.npy", order.astype(np.uint32))
        np.save(tmp / f"band{b}_hashes.npy", hashes[order])
        np.save(tmp / f"band{b}_offsets.npy", np.concatenate([[0], np.cumsum(np.bincount(band, minlength=1 << BAND_BITS))]))
    grams = [ngram_hashes(text, ngram) for _, _, text in captions] if ngram else []
    g = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
    rows = np.repeat(np.arange(len(items), len(items) + len(grams), dtype=np.int64), [len(x) for x in grams])
    order = np.argsort(g, kind="stable")
    np.save(tmp / "ngrams.npy", g[order])
    np.save(tmp / "ngram_items.npy", rows[order])
    keys = [key for _, key in items] + [key for _, key, _ in captions]
    (tmp / "keys.txt").write_text("".join(f"{k}\n" for k in keys))
    (tmp / "manifest.json").write_text(json.dumps({"tasks": tasks, "images": len(items), "captions": len(captions),
                                                   "ngram": ngram, "variants": VARIANTS}, allow_nan=False))
    os.replace(tmp, out)
    return out


class Decontaminator:
    """Checks built rows against an index: the image by perceptual hash, and the texts by n-gram
    when the index was built with caption n-grams."""

    def __init__(self, index: str | Path, max_distance: int = 6) -> None:
        if not 0 <= max_distance <= MAX_SUPPORTED_DISTANCE:
            raise ValueError(f"--decontam-max-distance must be in 0..{MAX_SUPPORTED_DISTANCE}, got {max_distance}")
        self.index, self.max_distance = HashIndex(index), max_distance

    def check(self, jpg: bytes, texts: list[str]) -> Match | None:
        found = self.index.nearest(phash_bytes(jpg), self.max_distance)
        if found is not None:
            return Match(*self.index.item(found[0]), "image", found[1])
        n = self.index.manifest["ngram"]
        for text in texts if n else []:
            item = self.index.caption_match(text, n)
            if item is not None:
                return Match(*self.index.item(item), "caption")
        return None

    def check_row(self, row: dict) -> None:
        """Raises ``Rejected('eval_contamination')``, naming the evaluation task and item, when the
        shard row (``jpg`` and its texts) matches."""
        match = self.check(row["jpg"], [row[name] for name in ("raw", "synthetic", "generated") if row.get(name)])
        if match is not None:
            rejected = Rejected("eval_contamination", match.detail())
            rejected.match = {"eval_task": match.task, "eval_item": match.item, "match": match.what,
                              "distance": match.distance}
            raise rejected

    def fingerprint(self) -> list:
        manifest = self.index.root / "manifest.json"
        return [str(self.index.root), os.path.getmtime(manifest), self.max_distance]
