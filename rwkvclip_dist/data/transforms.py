"""Image transforms of SPEC section 8 (PIL image in, normalised float tensor [3, S, S] out).

The training transform decodes a JPEG at reduced scale when the random crop allows it: most LAION
images are several times larger than the 224 px a step needs, so a full decode throws most pixels
away. ``TrainTransform`` draws the random resized crop from the header's size exactly as torchvision
does, asks libjpeg for the largest DCT reduction (1/2, 1/4, 1/8; PIL's draft mode) that keeps the crop
at or above the output size, and resamples the crop's exact source region (fractional in the reduced
image) to the output. ``reference_train_transform`` is the plain torchvision pipeline it replaces;
tests/test_data_transforms.py holds the two to the same crops.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from PIL import Image

from rwkvclip_dist.data.torchvision_light import import_torchvision

import_torchvision()  # without its package init (models, ops, dynamo): ~1.3 s of CPU per process

from torchvision import transforms as T  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms import functional as F  # noqa: E402

# OpenAI CLIP normalisation statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SCALE = (0.7, 1.0)    # area fraction of the random resized crop
CROP_RATIO = (0.8, 1.25)   # aspect ratio range of the random resized crop
DCT_REDUCTIONS = (8, 4, 2)  # what libjpeg's scaled IDCT offers through PIL's draft mode

log = logging.getLogger(__name__)
_told_no_draft = False


def _to_rgb(img):
    # Grayscale / palette / RGBA JPEG-likes must become 3 channels before normalisation.
    return img if img.mode == "RGB" else img.convert("RGB")


_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def normalized_tensor(img: Image.Image) -> torch.Tensor:
    """``Normalize(CLIP)(ToTensor()(img))`` for an RGB image, bit for bit, in one buffer: the
    torchvision pair allocates five copies of the image, which cost as much as the crop's resize."""
    arr = np.array(img)
    x = torch.empty((3,) + arr.shape[:2])
    x.copy_(torch.from_numpy(arr).permute(2, 0, 1))
    return x.div_(255).sub_(_MEAN).div_(_STD)


def reduction_for(crop_w: int, crop_h: int, size: int) -> int:
    """Largest DCT reduction that keeps a ``crop_w`` x ``crop_h`` crop at or above ``size`` px."""
    return next((s for s in DCT_REDUCTIONS if crop_w / s >= size and crop_h / s >= size), 1)


class TrainTransform:
    """Random resized crop (area 0.7-1.0, aspect 0.8-1.25, bicubic), horizontal flip, CLIP normalisation.

    Takes a PIL image, ideally not yet loaded (``Image.open`` without ``load``) so that a JPEG can be
    decoded at reduced scale. Draws from the global torch RNG exactly what the torchvision pipeline
    draws, in the same order (crop, then flip), so per-sample seeding stays exact.
    """

    def __init__(self, image_size: int, hflip: float = 0.5) -> None:
        self.size = image_size
        self.hflip = hflip

    def plan(self, img: Image.Image) -> tuple[tuple[int, int, int, int], bool]:
        """((top, left, height, width) of the crop in source pixels, flip?), from the torch RNG."""
        box = T.RandomResizedCrop.get_params(img, list(CROP_SCALE), list(CROP_RATIO))
        return box, bool(torch.rand(1) < self.hflip)  # RandomHorizontalFlip draws even when p == 0

    def __call__(self, img: Image.Image) -> torch.Tensor:
        (top, left, h, w), flip = self.plan(img)
        scale = reduction_for(w, h, self.size) if img.format == "JPEG" else 1
        if scale > 1 and self._draft(img, scale):
            img = _to_rgb(img)
            # The crop in reduced pixels is fractional; resample exactly that source region.
            box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
            out = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        else:
            out = F.resized_crop(_to_rgb(img), top, left, h, w, [self.size, self.size],
                                 InterpolationMode.BICUBIC)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return normalized_tensor(out)

    @staticmethod
    def _draft(img: Image.Image, scale: int) -> bool:
        """Ask the JPEG decoder for 1/``scale`` size; False if it cannot (already loaded, odd layout)."""
        width, height = img.size
        if img.draft(None, (width // scale, height // scale)) is None:
            global _told_no_draft
            if not _told_no_draft:
                log.info("a JPEG could not be decoded at reduced scale (already loaded, or a layout "
                         "PIL cannot draft); decoding such images in full")
                _told_no_draft = True
            return False
        if img.size != (math.ceil(width / scale), math.ceil(height / scale)):
            raise RuntimeError(f"JPEG draft gave {img.size} for {width}x{height} at 1/{scale}")
        return True


def train_transform(image_size: int, hflip: float = 0.5) -> TrainTransform:
    """The SPEC training transform (``hflip``: flip probability; SPEC 0.5, 0 for orientation-aware
    data); decodes JPEGs at reduced scale where the crop allows (``TrainTransform``)."""
    return TrainTransform(image_size, hflip)


def reference_train_transform(image_size: int, hflip: float = 0.5) -> T.Compose:
    """The same training transform as a plain torchvision pipeline on the fully decoded image: the
    reference ``TrainTransform`` is tested against, and the baseline of the input-pipeline benchmark."""
    return T.Compose([
        T.Lambda(_to_rgb),
        T.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO,
                            interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=hflip),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def eval_transform(image_size: int) -> T.Compose:
    """Bicubic resize of the short side to ``image_size``, centre crop, CLIP normalisation."""
    return T.Compose([
        T.Lambda(_to_rgb),
        T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
