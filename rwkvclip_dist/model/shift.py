"""Token shifts (SPEC section 2): the only place where the 1-D or 2-D neighbourhood enters.

Both shifts work inside each head: the N channels of every head are split into equal parts and
each part takes its value from one neighbour; out-of-range neighbours read as zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def q_shift(x: torch.Tensor, grid: tuple[int, int], head_size: int, num_extra_tokens: int = 0) -> torch.Tensor:
    """Quad-directional shift on an h x w token grid.

    x: [B, h*w + num_extra_tokens, C]. Quarter 1 of each head's channels takes the left neighbour,
    quarter 2 the right, quarter 3 the one above, quarter 4 the one below. Extra tokens appended
    after the patches (the class token) are not shifted: they return their own value.
    """
    batch, tokens, width = x.shape
    h, w = grid
    patches = x[:, : h * w] if num_extra_tokens else x
    heads, quarter = width // head_size, head_size // 4
    g = patches.reshape(batch, h, w, heads, 4, quarter)
    left = F.pad(g[:, :, :-1, :, 0], (0, 0, 0, 0, 1, 0))
    right = F.pad(g[:, :, 1:, :, 1], (0, 0, 0, 0, 0, 1))
    up = F.pad(g[:, :-1, :, :, 2], (0, 0, 0, 0, 0, 0, 1, 0))
    down = F.pad(g[:, 1:, :, :, 3], (0, 0, 0, 0, 0, 0, 0, 1))
    shifted = torch.stack((left, right, up, down), dim=4).reshape(batch, h * w, width)
    if num_extra_tokens:
        shifted = torch.cat((shifted, x[:, h * w :]), dim=1)
    return shifted


def b_shift(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """Bidirectional shift along the sequence: first half of each head's channels takes token t-1,
    second half token t+1. x: [B, T, C]."""
    batch, tokens, width = x.shape
    heads, half = width // head_size, head_size // 2
    g = x.reshape(batch, tokens, heads, 2, half)
    previous = F.pad(g[:, :-1, :, 0], (0, 0, 0, 0, 1, 0))
    following = F.pad(g[:, 1:, :, 1], (0, 0, 0, 0, 0, 1))
    return torch.stack((previous, following), dim=3).reshape(batch, tokens, width)
