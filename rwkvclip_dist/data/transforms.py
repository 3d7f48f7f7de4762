"""Image transforms of SPEC section 8 (PIL image in, normalised float tensor [3, S, S] out)."""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# OpenAI CLIP normalisation statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(img):
    # Grayscale / palette / RGBA JPEG-likes must become 3 channels before normalisation.
    return img if img.mode == "RGB" else img.convert("RGB")


def train_transform(image_size: int, hflip: float = 0.5) -> T.Compose:
    """Random resized crop (area 0.7-1.0, aspect 0.8-1.25), horizontal flip, CLIP normalisation.

    ``hflip`` is the flip probability (SPEC: 0.5); 0 suits data whose texts describe orientation.
    """
    return T.Compose([
        T.Lambda(_to_rgb),
        T.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.8, 1.25),
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
