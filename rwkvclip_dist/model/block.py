"""The pre-norm RWKV block (SPEC section 1) and stochastic depth."""
from __future__ import annotations

import torch
from torch import nn

from rwkvclip_dist.model.mixing import ChannelMix, Shift, TimeMix


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability ``rate`` while training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Block(nn.Module):
    """x = x + drop_path(time_mix(ln1(x))); x = x + drop_path(channel_mix(ln2(x))); block 0 adds ln0 first."""

    def __init__(self, index: int, width: int, head_size: int, ffn_dim: int, layer_norm_eps: float,
                 group_norm_eps: float, drop_path_rate: float = 0.0):
        super().__init__()
        self.index = index
        self.ln0 = nn.LayerNorm(width, eps=layer_norm_eps) if index == 0 else None
        self.ln1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.ln2 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.att = TimeMix(width, head_size, group_norm_eps)
        self.ffn = ChannelMix(width, ffn_dim)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor, shift: Shift) -> torch.Tensor:
        if self.ln0 is not None:
            x = self.ln0(x)
        x = x + self.drop_path(self.att(self.ln1(x), shift))
        return x + self.drop_path(self.ffn(self.ln2(x), shift))
