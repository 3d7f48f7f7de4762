"""The training transform decodes JPEGs at reduced scale (``TrainTransform``); against the torchvision
pipeline it replaces (``reference_train_transform``) it must draw the same random numbers, crop the
same source regions at the same sizes, and give nearly the same pixels (exactly the same when no
reduction is possible)."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from rwkvclip_dist.data.transforms import (CLIP_MEAN, CLIP_STD, CROP_RATIO, CROP_SCALE, TrainTransform,
                                           normalized_tensor, reduction_for, reference_train_transform)

SIZE = 224
# (width, height) -> the reductions their crops allow at 224 px: 1 only, 1-2, 2, 4, 4-8.
SOURCES = [(300, 260), (560, 500), (1024, 768), (2000, 1500), (2200, 2000)]


@functools.lru_cache(maxsize=None)
def photo(width: int, height: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """Position-encoding picture: red follows x, green follows y, blue a smooth pattern, mild noise."""
    rng = np.random.default_rng(width * 7 + height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([xx / width * 255, yy / height * 255, 128 + 80 * np.sin(xx / 41) * np.cos(yy / 29)], -1)
    pixels = (pixels + rng.normal(0, 3, pixels.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def _reference(data: bytes, seed: int, hflip: float = 0.5) -> torch.Tensor:
    img = Image.open(io.BytesIO(data))
    img.load()  # what the loader did before: a full decode
    torch.manual_seed(seed)
    return reference_train_transform(SIZE, hflip)(img)


def _fast(data: bytes, seed: int, hflip: float = 0.5) -> torch.Tensor:
    torch.manual_seed(seed)
    return TrainTransform(SIZE, hflip)(Image.open(io.BytesIO(data)))


def _grey_levels(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference in 0-255 grey levels (undoing the CLIP normalisation)."""
    return float(((a - b).abs() * torch.tensor(CLIP_STD).view(3, 1, 1)).mean() * 255)


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_same_draws_same_crop_boxes_largest_reduction(source):
    data = photo(*source)
    scales = set()
    for seed in range(40):
        img = Image.open(io.BytesIO(data))
        torch.manual_seed(seed)
        box, flip = TrainTransform(SIZE).plan(img)
        after_plan = torch.get_rng_state()
        torch.manual_seed(seed)
        assert box == tuple(T.RandomResizedCrop.get_params(img, list(CROP_SCALE), list(CROP_RATIO)))
        assert flip == bool(torch.rand(1) < 0.5)
        assert torch.equal(after_plan, torch.get_rng_state()), "a different number of random draws"
        top, left, h, w = box
        s = reduction_for(w, h, SIZE)
        scales.add(s)
        assert s == 1 or (w / s >= SIZE and h / s >= SIZE), "the reduced crop must not be smaller than the output"
        assert s == 8 or w / (2 * s) < SIZE or h / (2 * s) < SIZE, "not the largest reduction"
        if s > 1:
            # The decoder's 1/s image; the crop box in it maps back onto exactly the source box.
            assert TrainTransform._draft(img, s) and img.size == (-(-source[0] // s), -(-source[1] // s))
    expected = {(300, 260): {1}, (560, 500): {1, 2}, (1024, 768): {2}, (2000, 1500): {4},
                (2200, 2000): {4, 8}}[source]
    assert scales == expected


@pytest.mark.parametrize("source", [SOURCES[1], SOURCES[2], SOURCES[4]], ids=lambda s: f"{s[0]}x{s[1]}")
def test_reduced_decode_covers_the_same_region(source):
    """Outputs differ from the full-decode pipeline's by under 1.5 grey levels on average, while the
    same crop moved by 2% of its width already differs by several times that: the region is the same."""
    data = photo(*source)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    for seed in range(4):
        fast, ref = _fast(data, seed, hflip=0.0), _reference(data, seed, hflip=0.0)
        assert fast.shape == ref.shape == (3, SIZE, SIZE)
        err = _grey_levels(fast, ref)
        assert err < 1.5, f"seed {seed}: {err:.2f} grey levels from the full-decode output"
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(full, list(CROP_SCALE), list(CROP_RATIO))
        shift = max(1, w // 50) if left + w + w // 50 <= source[0] else -max(1, w // 50)
        moved = F.resized_crop(full, top, left + shift, h, w, [SIZE, SIZE], InterpolationMode.BICUBIC)
        moved = T.Normalize(CLIP_MEAN, CLIP_STD)(F.to_tensor(moved))
        assert _grey_levels(moved, ref) > 3 * err


def test_flip_and_grey_jpeg_follow_the_reference():
    data = photo(1024, 768, mode="L")
    for seed in range(6):  # flips on some seeds, not others, as the reference does
        fast, ref = _fast(data, seed), _reference(data, seed)
        assert fast.shape == (3, SIZE, SIZE) and _grey_levels(fast, ref) < 1.5


@pytest.mark.parametrize("fmt,source", [("JPEG", (300, 260)), ("PNG", (600, 500))])
def test_no_reduction_is_bit_identical(fmt, source):
    """Crops too small to reduce, and non-JPEG images, take the full decode: the old output exactly."""
    data = photo(*source, fmt=fmt)
    for seed in range(4):
        assert torch.equal(_fast(data, seed), _reference(data, seed))
    loaded = Image.open(io.BytesIO(photo(1024, 768)))
    loaded.load()  # already decoded: nothing to draft, same result as the reference
    torch.manual_seed(0)
    assert torch.equal(TrainTransform(SIZE)(loaded), _reference(photo(1024, 768), 0))


def test_normalized_tensor_equals_torchvision_bit_for_bit():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (31, 17, 3), dtype=np.uint8))
    assert torch.equal(normalized_tensor(img), T.Normalize(CLIP_MEAN, CLIP_STD)(F.to_tensor(img)))


def test_the_transforms_import_torchvision_without_its_package_init():
    """A training rank imports torchvision's transforms only (its package init imports every model,
    the ops and torch._dynamo: ~1.3 s of CPU per process); what the init defines is still there on
    first access, once, and the rest of torchvision imports as usual."""
    import subprocess
    import sys

    code = """if True:
        import sys
        import rwkvclip_dist.data.transforms
        left_out = [m for m in ("torchvision.models", "torchvision.ops", "torchvision.io", "torch._dynamo")
                    if m in sys.modules]
        import torch, torchvision
        from torchvision import get_image_backend, transforms
        from torchvision.datasets import ImageFolder
        import torchvision.models
        print(left_out, get_image_backend(), torchvision.__version__ == torchvision.version.__version__,
              transforms is rwkvclip_dist.data.transforms.T, callable(torchvision.models.resnet18),
              hasattr(torch.ops.torchvision, "nms"))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "PIL", "True", "True", "True", "True"], out
