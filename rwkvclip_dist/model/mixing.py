"""Time mix (SPEC section 3) and channel mix (SPEC section 5), shared by both towers.

The tower decides the neighbourhood by passing ``shift``: a function [B, T, C] -> [B, T, C]
(Q-shift for images, B-shift for text). Parameter names follow the released checkpoints where that
reads well (``maa_*``, ``decay``, ``bonus``); ``rwkvclip_dist.convert`` maps them exactly.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rwkvclip_dist.ops import bi_wkv

Shift = Callable[[torch.Tensor], torch.Tensor]

MIX_LORA_RANK = 32
DECAY_LORA_RANK = 64
MIX_TARGETS = ("w", "k", "v", "r", "g")


class TimeMix(nn.Module):
    """RWKV-6 time mix with data-dependent token-shift lerps and decay, Bi-WKV and per-head GroupNorm."""

    def __init__(self, width: int, head_size: int, group_norm_eps: float):
        super().__init__()
        self.width, self.head_size = width, head_size
        self.num_heads = width // head_size
        self.maa_x = nn.Parameter(torch.zeros(1, 1, width))
        self.maa_w = nn.Parameter(torch.zeros(1, 1, width))
        self.maa_k = nn.Parameter(torch.zeros(1, 1, width))
        self.maa_v = nn.Parameter(torch.zeros(1, 1, width))
        self.maa_r = nn.Parameter(torch.zeros(1, 1, width))
        self.maa_g = nn.Parameter(torch.zeros(1, 1, width))
        self.maa_w1 = nn.Parameter(torch.zeros(width, len(MIX_TARGETS) * MIX_LORA_RANK))
        self.maa_w2 = nn.Parameter(torch.zeros(len(MIX_TARGETS), MIX_LORA_RANK, width))
        self.decay = nn.Parameter(torch.zeros(1, 1, width))
        self.decay_w1 = nn.Parameter(torch.zeros(width, DECAY_LORA_RANK))
        self.decay_w2 = nn.Parameter(torch.zeros(DECAY_LORA_RANK, width))
        self.bonus = nn.Parameter(torch.zeros(self.num_heads, head_size))
        self.receptance = nn.Linear(width, width, bias=False)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width, bias=False)
        self.gate = nn.Linear(width, width, bias=False)
        self.output = nn.Linear(width, width, bias=False)
        self.ln_x = nn.GroupNorm(self.num_heads, width, eps=group_norm_eps)

    def forward(self, x: torch.Tensor, shift: Shift) -> torch.Tensor:
        batch, tokens, width = x.shape
        delta = shift(x) - x
        lora_in = torch.tanh((x + delta * self.maa_x) @ self.maa_w1)
        lora_in = lora_in.view(batch * tokens, len(MIX_TARGETS), MIX_LORA_RANK).transpose(0, 1)
        m_w, m_k, m_v, m_r, m_g = (lora_in @ self.maa_w2).view(len(MIX_TARGETS), batch, tokens, width).unbind(0)
        x_w = x + delta * (self.maa_w + m_w)
        x_k = x + delta * (self.maa_k + m_k)
        x_v = x + delta * (self.maa_v + m_v)
        x_r = x + delta * (self.maa_r + m_r)
        x_g = x + delta * (self.maa_g + m_g)

        r = self.receptance(x_r)
        k = self.key(x_k)
        v = self.value(x_v)
        g = F.silu(self.gate(x_g))
        w = self.decay + self.decay_lora(x_w)

        # Heads and width are read from r, not from x: a tensor-parallel rank holds only its heads
        # (rwkvclip_dist.parallel.tensor_parallel) while x stays full width.
        heads = (batch, tokens, r.shape[-1] // self.head_size, self.head_size)
        y = bi_wkv(r.view(heads), k.view(heads), v.view(heads), w.view(heads), self.bonus)
        y = self.ln_x(y.reshape(batch * tokens, r.shape[-1])).view_as(r)
        return self.output(y * g)

    def decay_lora(self, x_w: torch.Tensor) -> torch.Tensor:
        """The data-dependent part of the decay, tanh(x_w D1) D2."""
        return torch.tanh(x_w @ self.decay_w1) @ self.decay_w2


class ChannelMix(nn.Module):
    """Squared-ReLU channel mix with static token-shift lerps: sigma(x_r R) * (relu(x_k K)^2 V)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.maa_k = nn.Parameter(torch.zeros(1, 1, width))
        self.maa_r = nn.Parameter(torch.zeros(1, 1, width))
        self.key = nn.Linear(width, hidden, bias=False)
        self.receptance = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor, shift: Shift) -> torch.Tensor:
        delta = shift(x) - x
        x_k = x + delta * self.maa_k
        x_r = x + delta * self.maa_r
        hidden = torch.relu(self.key(x_k)).square()
        return torch.sigmoid(self.receptance(x_r)) * self.value(hidden)
