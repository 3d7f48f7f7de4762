"""Embeddings computed directly from an authors'-layout state dict, in float64 (SPEC sections 1-6).

This is the "other side" of ``convert_checkpoint.py --verify``: it reads the released key names
and the authors' own parameterisation (the image channel mix's complementary lerp, bf16 text
decays upcast), never our modules, so a mistake in the key mapping or the ``1 - a`` rule shows up
as a cosine below 1. It uses the float64 O(T^2) Bi-WKV reference, so keep batches small.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from rwkvclip_dist.model.shift import b_shift, q_shift
from rwkvclip_dist.ops.bi_wkv_reference import bi_wkv_float64

LORA_RANK = 32


def _ln(x, sd, prefix, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _time_mix(x, sd, p, shift, head_size, gn_eps):
    b, t, c = x.shape
    s = shift(x) - x
    mix = torch.tanh((x + s * sd[p + "time_maa_x"]) @ sd[p + "time_maa_w1"]).view(b, t, 5, LORA_RANK)
    m_w, m_k, m_v, m_r, m_g = torch.einsum("btfr,frc->fbtc", mix, sd[p + "time_maa_w2"])
    lerp = {z: x + s * (sd[p + f"time_maa_{z}"] + m) for z, m in zip("wkvrg", (m_w, m_k, m_v, m_r, m_g))}
    r = lerp["r"] @ sd[p + "receptance.weight"].t()
    k = lerp["k"] @ sd[p + "key.weight"].t()
    v = lerp["v"] @ sd[p + "value.weight"].t()
    g = F.silu(lerp["g"] @ sd[p + "gate.weight"].t())
    w = sd[p + "time_decay"] + torch.tanh(lerp["w"] @ sd[p + "time_decay_w1"]) @ sd[p + "time_decay_w2"]
    heads = (b, t, c // head_size, head_size)
    y = bi_wkv_float64(r.view(heads), k.view(heads), v.view(heads), w.view(heads), sd[p + "time_faaaa"])
    y = F.group_norm(y.reshape(b * t, c), c // head_size, sd[p + "ln_x.weight"], sd[p + "ln_x.bias"], gn_eps)
    return (y.view(b, t, c) * g) @ sd[p + "output.weight"].t()


def _channel_mix(x, sd, p, shift, complementary):
    shifted = shift(x)
    if complementary:  # the authors' image tower: x*a + shift(x)*(1-a)
        a_k, a_r = sd[p + "spatial_mix_k"], sd[p + "spatial_mix_r"]
        x_k, x_r = x * a_k + shifted * (1 - a_k), x * a_r + shifted * (1 - a_r)
    else:
        x_k = x + (shifted - x) * sd[p + "time_maa_k"]
        x_r = x + (shifted - x) * sd[p + "time_maa_r"]
    hidden = torch.relu(x_k @ sd[p + "key.weight"].t()).square()
    return torch.sigmoid(x_r @ sd[p + "receptance.weight"].t()) * (hidden @ sd[p + "value.weight"].t())


def _blocks(x, sd, prefix, depth, shift, head_size, gn_eps, complementary):
    for i in range(depth):
        p = f"{prefix}{i}."
        if i == 0:
            x = _ln(x, sd, p + "ln0")
        x = x + _time_mix(_ln(x, sd, p + "ln1"), sd, p + "att.", shift, head_size, gn_eps)
        x = x + _channel_mix(_ln(x, sd, p + "ln2"), sd, p + "ffn.", shift, complementary)
    return x


@torch.no_grad()
def authors_encode_image(sd: dict[str, torch.Tensor], images: torch.Tensor, depth: int, head_size: int,
                         patch_size: int) -> torch.Tensor:
    """Mean-pooled image embedding [B, C] (paper configs have no projection)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["image_model.patch_embed.projection.weight"],
                 sd["image_model.patch_embed.projection.bias"], stride=patch_size)
    grid = (x.shape[2], x.shape[3])
    x = x.flatten(2).transpose(1, 2) + sd["image_model.pos_embed"]
    shift = partial(q_shift, grid=grid, head_size=head_size)
    x = _blocks(x, sd, "image_model.layers.", depth, shift, head_size, 1e-5, complementary=True)
    return _ln(x, sd, "image_model.ln1").mean(dim=1)


@torch.no_grad()
def authors_encode_text(sd: dict[str, torch.Tensor], tokens: torch.Tensor, depth: int, head_size: int) -> torch.Tensor:
    """Paper pooling: L2-normalise every token output, then average over all positions."""
    sd = {k: v.double() for k, v in sd.items()}
    x = sd["text_model.emb.weight"][tokens]
    shift = partial(b_shift, head_size=head_size)
    x = _blocks(x, sd, "text_model.blocks.", depth, shift, head_size, 1e-5 * 8**2, complementary=False)
    return F.normalize(_ln(x, sd, "text_model.ln_out"), dim=-1).mean(dim=1)
