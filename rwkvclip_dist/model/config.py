"""Typed architecture configs for the two towers and the CLIP wrapper (SPEC sections 1-7).

Registry files in ``rwkvclip_dist/configs/models/*.json`` are loaded into these dataclasses by the
package's one typed-config loader (``rwkvclip_dist.typed_config``); unknown keys and wrong types are
errors that name the file and the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from rwkvclip_dist.typed_config import ConfigError, build_dataclass


@dataclass
class ImageTowerConfig:
    image_size: int = 224
    """Input resolution in pixels (square). Other resolutions resize the position embedding bicubically."""
    patch_size: int = 16
    """Side of the square patches of the conv patch embedding."""
    width: int = 640
    """Channel width C."""
    depth: int = 12
    """Number of RWKV blocks L."""
    head_size: int = 80
    """Head size N (C / N heads); divisible by 4 for the Q-shift."""
    ffn_dim: int = 3200
    """Hidden width F of the channel mix."""
    drop_path_rate: float = 0.3
    """Stochastic depth: block i drops its branches with rate linspace(0, rate, depth)[i]."""
    pool: Literal["mean", "token"] = "mean"
    """'mean' over patch tokens (paper) or 'token': an appended, unshifted class token."""
    layer_norm_eps: float = 1e-5
    group_norm_eps: float = 1e-5
    """Epsilon of the per-head GroupNorm after Bi-WKV."""
    in_channels: int = 3

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


@dataclass
class TextTowerConfig:
    vocab_size: int = 49408
    """CLIP BPE vocabulary."""
    context_length: int = 77
    width: int = 640
    depth: int = 6
    head_size: int = 64
    """Head size N; even for the B-shift (the paper uses 64)."""
    ffn_dim: int = 2240
    pool: Literal["paper", "masked_mean"] = "paper"
    """'paper': L2-normalise each token output, then mean over all positions (padding included);
    'masked_mean': mean over the tokens up to and including <end>."""
    layer_norm_eps: float = 1e-5
    group_norm_eps: float = 6.4e-4
    """1e-5 * 8**2, as the RWKV-6 language model uses."""
    end_token_id: int = 49407


@dataclass
class ModelConfig:
    embed_dim: int = 640
    """Joint embedding width. A tower whose width differs gets a bias-free linear projection."""
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    init_logit_scale: float = 2.6592600369262695
    """ln(1 / 0.07)."""
    init_logit_bias: float | None = None
    """A learned logit bias for the SigLIP loss, initialised to this (SigLIP: -10); None: no bias
    parameter (the CLIP loss, or SigLIP with the recipe's fixed ``loss.siglip_bias``)."""
    name: str = ""
    """Registry name this config came from (informational)."""

    def validate(self) -> None:
        img, txt = self.image, self.text
        _check(img.width % img.head_size == 0, f"image.width {img.width} is not a multiple of image.head_size {img.head_size}")
        _check(img.head_size % 4 == 0, f"image.head_size {img.head_size} must be divisible by 4 for the Q-shift")
        _check(img.image_size % img.patch_size == 0, f"image.image_size {img.image_size} is not a multiple of patch_size {img.patch_size}")
        _check(txt.width % txt.head_size == 0, f"text.width {txt.width} is not a multiple of text.head_size {txt.head_size}")
        _check(txt.head_size % 2 == 0, f"text.head_size {txt.head_size} must be even for the B-shift")
        _check(img.pool in ("mean", "token"), f"image.pool must be 'mean' or 'token', got {img.pool!r}")
        _check(txt.pool in ("paper", "masked_mean"), f"text.pool must be 'paper' or 'masked_mean', got {txt.pool!r}")
        for tower in (img, txt):
            _check(tower.depth >= 1 and tower.width >= 1 and tower.ffn_dim >= 1, f"depth, width and ffn_dim must be positive: {tower}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
    """Build a ModelConfig from plain data; top-level keys starting with '_' are comments."""
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    config = build_dataclass(ModelConfig, data, {}, source)
    try:
        config.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return config


def apply_overrides(config: ModelConfig, overrides: dict[str, Any], source: str) -> ModelConfig:
    """Apply overrides such as ``{"image": {"depth": 2}}`` or ``{"image.depth": 2}``."""
    nested: dict[str, Any] = config.to_dict()
    for key, value in overrides.items():
        parts = key.split(".") if isinstance(key, str) else [key]
        if len(parts) == 1 and isinstance(value, dict) and parts[0] in ("image", "text"):
            nested[parts[0]].update(value)
            continue
        target = nested
        for part in parts[:-1]:
            if part not in target or not isinstance(target[part], dict):
                raise ConfigError(f"{source}: unknown override {key!r}")
            target = target[part]
        if parts[-1] not in target:
            raise ConfigError(f"{source}: unknown override {key!r}")
        target[parts[-1]] = value
    return config_from_dict(nested, source)
