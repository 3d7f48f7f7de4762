"""The inference API: open_clip-style factory, tokenizer and checkpoint loading.

    model, train_tf, eval_tf = create_model_and_transforms("RWKV-CLIP-B-32", pretrained="b32.safetensors")
    model, train_tf, eval_tf = create_model_and_transforms("hf-hub:ORG/NAME")   # tools/export_hub.py
    tokenizer = get_tokenizer("RWKV-CLIP-B-32")
    probs = (100 * model.encode_image(img, normalize=True) @ model.encode_text(tokenizer(texts), normalize=True).T).softmax(-1)

Pretrained files are safetensors with a JSON config (``rwkvclip_dist.pretrained_format``); torch pickles
are read with ``weights_only=True`` only. The models returned are plain ``nn.Module``s with
``encode_image`` / ``encode_text``, so CLIP_benchmark and open_clip-style code use them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rwkvclip_dist.hub import download, is_hub_name
from rwkvclip_dist.pretrained_format import (
    check_state_dict,
    config_record,
    load_state_dict_file,
    read_config,
    read_record,
    save_safetensors,
)
from rwkvclip_dist.model.clip import RWKVCLIP
from rwkvclip_dist.model.config import ImageTowerConfig, ModelConfig, apply_overrides
from rwkvclip_dist.model.registry import get_model_config
from rwkvclip_dist.model.towers import ImageTower


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Loads all weights of ``path`` into ``model`` or raises, listing every key problem; never partial."""
    state = load_state_dict_file(path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, str(path))
    model.load_state_dict(state, strict=True)
    return model


def save_pretrained(model: RWKVCLIP, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Writes ``path`` (.safetensors) and ``path.json`` for :func:`create_model_and_transforms`."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return save_safetensors(state, path, config_record(model.config, "clip", dtype))


def _resolve_config(name: str | None, pretrained: str | Path | None, overrides: dict[str, Any]) -> ModelConfig:
    if pretrained is None:
        if name is None:
            raise ValueError("create_model_and_transforms needs a model name or a pretrained file")
        return get_model_config(name, **overrides)
    if Path(pretrained).suffix != ".safetensors":
        raise ValueError(f"{pretrained}: pretrained files are this project's .safetensors (with their JSON config); "
                         f"convert the authors' .pt with tools/convert_checkpoint.py from-authors, a training "
                         f"checkpoint with from-zero")
    config = read_config(pretrained)
    if name is not None and name != config.name:
        raise ValueError(f"{pretrained} holds a {config.name!r} model, not {name!r}")
    if overrides:
        config = apply_overrides(config, overrides, f"{pretrained} (overrides)")
    return config


def load_model(name: str | None, pretrained: str | Path | None = None, device: str | torch.device = "cpu",
               **overrides: Any) -> RWKVCLIP:
    """An RWKV-CLIP model for inference, in eval mode; with ``pretrained``, its weights and its
    architecture come from the file (``name`` may then be None, and must agree with the file otherwise).
    Without ``pretrained`` the weights are freshly initialised (smoke tests). For a fresh model to
    train, use :func:`rwkvclip_dist.create_model`. ``name`` may be ``hf-hub:ORG/NAME``: a model
    repository of ``tools/export_hub.py``, through huggingface_hub (``rwkvclip_dist.hub``)."""
    if is_hub_name(name):
        name, pretrained = None, download(name)
    config = _resolve_config(name, pretrained, overrides)
    model = RWKVCLIP(config, initialize=pretrained is None)
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    return model.to(device).eval()


def create_model_and_transforms(name: str | None, pretrained: str | Path | None = None,
                                device: str | torch.device = "cpu", **overrides: Any):
    """``(model, train_transform, eval_transform)``; the transforms match the model's resolution."""
    from rwkvclip_dist.data.transforms import eval_transform, train_transform

    model = load_model(name, pretrained, device, **overrides)
    size = model.config.image.image_size
    return model, train_transform(size), eval_transform(size)


def get_tokenizer(name: str | Path) -> Callable[[str | Sequence[str]], torch.Tensor]:
    """The CLIP BPE tokenizer at the model's context length (``name``: registry name or pretrained file)."""
    from rwkvclip_dist.data.tokenizer import tokenize

    path = download(str(name)) if is_hub_name(name) else Path(name)
    config = read_config(path) if path.suffix == ".safetensors" else get_model_config(str(name))
    return partial(tokenize, context_length=config.text.context_length)


class VisionEncoder(nn.Module):
    """The image tower alone (plus its projection when it has one), for VLMs.

    ``forward(images)`` returns ``(pooled [B, E], patch tokens [B, h*w, C])``, the tokens taken after
    the final LayerNorm, as ``RWKVCLIP.encode_image(images, return_tokens=True)`` does.
    """

    def __init__(self, config: ImageTowerConfig, embed_dim: int):
        super().__init__()
        self.config, self.embed_dim = config, embed_dim
        self.visual = ImageTower(config)
        self.visual_proj = nn.Linear(config.width, embed_dim, bias=False) if config.width != embed_dim else None

    def forward(self, images: torch.Tensor):
        pooled, tokens = self.visual(images, return_tokens=True)
        if self.visual_proj is not None:
            pooled = self.visual_proj(pooled)
        return pooled, tokens


def vision_state_dict(model: RWKVCLIP) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("visual.", "visual_proj."))}


def save_vision_encoder(model: RWKVCLIP, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    state = {k: v.to(dtype) for k, v in vision_state_dict(model).items()}
    return save_safetensors(state, path, config_record(model.config, "vision_encoder", dtype))


def load_vision_encoder(path: str | Path, device: str | torch.device = "cpu") -> VisionEncoder:
    """A standalone :class:`VisionEncoder` from a file of ``tools/export_vision_encoder.py``."""
    record = read_record(path)
    if record.get("kind") != "vision_encoder":
        raise ValueError(f"{path}: kind is {record.get('kind')!r}, expected 'vision_encoder'")
    config = read_config(path)
    encoder = VisionEncoder(config.image, config.embed_dim)
    return load_checkpoint(encoder, path).to(device).eval()
