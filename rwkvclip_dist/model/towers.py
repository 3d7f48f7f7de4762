"""The image tower (patches, Q-shift) and the text tower (tokens, B-shift), SPEC sections 1, 2 and 6."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rwkvclip_dist.model.block import Block
from rwkvclip_dist.model.config import ImageTowerConfig, TextTowerConfig
from rwkvclip_dist.model.shift import b_shift, q_shift


class _Tower(nn.Module):
    """Runs the block stack, with per-block activation checkpointing when enabled."""

    blocks: nn.ModuleList
    activation_checkpointing: bool = False

    def _run_blocks(self, x: torch.Tensor, shift) -> torch.Tensor:
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: the reentrant variant drops gradients when x does not require grad.
                x = checkpoint(block, x, shift, use_reentrant=False)
            else:
                x = block(x, shift)
        return x


class ImageTower(_Tower):
    """conv patches -> + position embedding -> [class token] -> blocks -> LayerNorm -> pooled."""

    def __init__(self, config: ImageTowerConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = nn.Conv2d(config.in_channels, width, config.patch_size, stride=config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, width))
        self.class_token = nn.Parameter(torch.zeros(1, 1, width)) if config.pool == "token" else None
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(i, width, config.head_size, config.ffn_dim, config.layer_norm_eps, config.group_norm_eps, rates[i])
            for i in range(config.depth)
        )
        self.ln_out = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The learned position embedding, bicubically resized when the patch grid differs."""
        size = self.config.grid_size
        if grid == (size, size):
            return self.pos_embed
        table = self.pos_embed.reshape(1, size, size, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False).to(self.pos_embed.dtype)
        return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)

    def forward(self, images: torch.Tensor, return_tokens: bool = False):
        x = self.patch_embed(images)  # [B, C, h, w]
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2) + self.position_embedding(grid)
        extra = 0
        if self.class_token is not None:
            x = torch.cat((x, self.class_token.expand(x.shape[0], -1, -1)), dim=1)
            extra = 1
        shift = partial(q_shift, grid=grid, head_size=self.config.head_size, num_extra_tokens=extra)
        x = self.ln_out(self._run_blocks(x, shift))
        patches = x[:, : grid[0] * grid[1]]
        pooled = x[:, -1] if self.class_token is not None else patches.mean(dim=1)
        return (pooled, patches) if return_tokens else pooled


class TextTower(_Tower):
    """token embedding (no positions) -> blocks -> LayerNorm -> pooled (paper: per-token L2 then mean)."""

    def __init__(self, config: TextTowerConfig):
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.ModuleList(
            Block(i, config.width, config.head_size, config.ffn_dim, config.layer_norm_eps, config.group_norm_eps)
            for i in range(config.depth)
        )
        self.ln_out = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, tokens: torch.Tensor, return_tokens: bool = False):
        x = self.token_embed(tokens)
        x = self.ln_out(self._run_blocks(x, partial(b_shift, head_size=self.config.head_size)))
        if self.config.pool == "paper":
            pooled = F.normalize(x, dim=-1).mean(dim=1)
        else:
            pooled = _mean_through_end_token(x, tokens, self.config.end_token_id)
        return (pooled, x) if return_tokens else pooled


def _mean_through_end_token(x: torch.Tensor, tokens: torch.Tensor, end_token_id: int) -> torch.Tensor:
    """Mean over positions up to and including the first <end> (all positions if there is none)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    is_end = tokens == end_token_id
    last = torch.where(is_end.any(1), is_end.int().argmax(1), torch.full_like(tokens[:, 0], tokens.shape[1] - 1))
    mask = (positions[None, :] <= last[:, None]).to(x.dtype)
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
