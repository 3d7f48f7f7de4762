"""The CLIP wrapper: two towers, optional bias-free projections, a learned logit scale (SPEC section 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rwkvclip_dist.model.config import ModelConfig
from rwkvclip_dist.model.init import init_clip
from rwkvclip_dist.model.towers import ImageTower, TextTower


class RWKVCLIP(nn.Module):
    def __init__(self, config: ModelConfig, initialize: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        self.visual = ImageTower(config.image)
        self.text = TextTower(config.text)
        # Paper configs have none: both towers are 640 wide and the embedding is the pooled output.
        self.visual_proj = (nn.Linear(config.image.width, config.embed_dim, bias=False)
                            if config.image.width != config.embed_dim else None)
        self.text_proj = (nn.Linear(config.text.width, config.embed_dim, bias=False)
                          if config.text.width != config.embed_dim else None)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.tensor(float(config.init_logit_bias)))
                           if config.init_logit_bias is not None else None)
        if initialize:
            init_clip(self)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (saves memory, costs one forward)."""
        self.visual.activation_checkpointing = enabled
        self.text.activation_checkpointing = enabled

    def encode_image(self, images: torch.Tensor, normalize: bool = False, return_tokens: bool = False):
        """Pooled image embedding [B, E]; with ``return_tokens`` also the per-patch features
        [B, h*w, C] after the final LayerNorm (for VLMs that use the tower as a vision encoder)."""
        pooled, tokens = self.visual(images, return_tokens=True)
        if self.visual_proj is not None:
            pooled = self.visual_proj(pooled)
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return (pooled, tokens) if return_tokens else pooled

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        pooled = self.text(tokens)
        if self.text_proj is not None:
            pooled = self.text_proj(pooled)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> dict:
        out = {"logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if images is not None:
            out["image_features"] = self.encode_image(images, normalize=True)
        if tokens is not None:
            out["text_features"] = self.encode_text(tokens, normalize=True)
        return out
