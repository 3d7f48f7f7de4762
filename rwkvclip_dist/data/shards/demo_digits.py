"""The embedded demo data set: scikit-learn's 1,797 handwritten digits as coloured 32x32 RGB JPEGs.

Each digit gets a deterministic ink colour, background and small offset, and three texts in the three
styles of SPEC section 8 (terse raw label, plain synthetic caption, richer generated description).
A stratified 20% is held out, with a ``label`` column, for zero-shot evaluation with ``zeroshot.json``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
from rwkvclip_dist.data.streaming_compat import MDSWriter

from rwkvclip_dist.data.columns import COMPRESSION, columns

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}.", "a handwritten number {}.", "the number {}.",
             "a drawing of the digit {}.", "an image of a handwritten {}."]
# (name, RGB) ink colours, all bright on the dark backgrounds so the digit shape stays clean.
INKS = [("white", (245, 245, 245)), ("red", (235, 60, 50)), ("green", (70, 210, 90)),
        ("yellow", (240, 220, 60)), ("cyan", (70, 220, 230)), ("orange", (250, 150, 40))]
BACKGROUNDS = [("black", (0, 0, 0)), ("navy", (20, 25, 70)), ("dark grey", (45, 45, 45))]
IMAGE_SIZE = 32
DIGIT_SIZE = 26
HELDOUT_FRACTION = 0.2
SEED = 0
SPLITS = ("train", "heldout")


def render(pixels: np.ndarray, ink: tuple, background: tuple, offset: tuple[int, int]) -> Image.Image:
    """8x8 grey levels 0..16 -> RGB image: bicubic upscale of the ink mask, blended over the background."""
    mask = Image.fromarray((pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8), "L")
    mask = np.asarray(mask.resize((DIGIT_SIZE, DIGIT_SIZE), Image.BICUBIC), dtype=np.float32) / 255
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    canvas[:] = background
    y, x = offset
    patch = canvas[y:y + DIGIT_SIZE, x:x + DIGIT_SIZE]
    patch[:] = patch * (1 - mask[..., None]) + np.asarray(ink, np.float32) * mask[..., None]
    return Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8), "RGB")


def texts(label: int, ink: str, background: str, rng: np.random.Generator) -> dict[str, str]:
    """The three texts of one digit; the synthetic and generated styles vary their wording."""
    name = CLASSNAMES[label]
    synthetic = rng.choice(["a photo of the digit {}", "a handwritten digit {}",
                            "the number {} written by hand"]).format(name)
    generated = rng.choice([
        "a handwritten number {n} ({d}) drawn in {i} ink on a {b} background",
        "the digit {d}, a {i} handwritten {n}, centred on a plain {b} square",
        "a small {i} sketch of the number {n} (the digit {d}) against {b}",
    ]).format(n=name, d=label, i=ink, b=background)
    return {"raw": str(label), "synthetic": synthetic, "generated": generated}


def _rows(split: str) -> list[dict]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, held_idx = train_test_split(idx, test_size=HELDOUT_FRACTION, stratify=digits.target,
                                           random_state=SEED)
    rows = []
    for i in sorted(train_idx if split == "train" else held_idx):
        rng = np.random.default_rng([SEED, int(i)])
        ink = INKS[rng.integers(len(INKS))]
        bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        slack = IMAGE_SIZE - DIGIT_SIZE
        offset = (int(rng.integers(slack + 1)), int(rng.integers(slack + 1)))
        img = render(digits.data[i], ink[1], bg[1], offset)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        label = int(digits.target[i])
        rows.append({"key": f"digits-{i:04d}", "jpg": buf.getvalue(), **texts(label, ink[0], bg[0], rng),
                     "tags": ["digit", CLASSNAMES[label], ink[0], bg[0]],
                     "width": IMAGE_SIZE, "height": IMAGE_SIZE, "source": f"sklearn.datasets.load_digits[{i}]",
                     "label": label})
    return rows


def build_demo_data(out_dir: str) -> str:
    """Write ``out_dir/{train,heldout}/`` MDS shards and ``out_dir/zeroshot.json`` (overwrites)."""
    for split in SPLITS:
        with MDSWriter(out=os.path.join(out_dir, split), columns=columns(with_label=True),
                       compression=COMPRESSION, size_limit=1 << 22) as w:
            for row in _rows(split):
                w.write(row)
    with open(os.path.join(out_dir, "zeroshot.json"), "w") as f:
        json.dump({"classnames": CLASSNAMES, "templates": TEMPLATES}, f, indent=2, allow_nan=False)
    return out_dir


def ensure_demo_data(out_dir: str) -> str:
    """Return ``out_dir``, building the demo set first if it is not there.

    Built in a sibling temp directory and renamed into place, so a crash never leaves a half set and
    several ranks or jobs may call this at once: the first rename wins and the others discard theirs.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.isfile(os.path.join(out_dir, "zeroshot.json")):
        return out_dir
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists but is not a complete demo data set (no zeroshot.json); "
                              f"remove it or choose another directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-digits-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is meant to be shared
    try:
        build_demo_data(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty placeholder; os.rename cannot replace a directory otherwise
        os.rename(tmp, out_dir)
    except OSError:
        if not os.path.isfile(os.path.join(out_dir, "zeroshot.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
