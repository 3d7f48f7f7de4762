"""Analytic forward FLOPs per sample (2 FLOPs per multiply-add), for the README table and MFU.

Counts every matrix product and the Bi-WKV state work; elementwise ops, norms and the embedding
lookup are left out, as is customary for MFU estimates. ``tensor_parallel=t`` gives what one of t
tensor-parallel ranks computes (``parallel.tensor_parallel`` splits heads and channel-mix hidden units;
the token-shift LoRA, the decay LoRA's first matrix and the channel mix's receptance stay whole).
"""
from __future__ import annotations

from rwkvclip_dist.model.config import ModelConfig
from rwkvclip_dist.model.mixing import DECAY_LORA_RANK, MIX_LORA_RANK, MIX_TARGETS


def block_macs_per_token(width: int, ffn_dim: int, head_size: int, tensor_parallel: int = 1) -> int:
    local = width // tensor_parallel  # this rank's channels of r, k, v, w, g
    time_mix = (
        width * len(MIX_TARGETS) * MIX_LORA_RANK  # first token-mix LoRA
        + len(MIX_TARGETS) * MIX_LORA_RANK * width  # five second LoRAs
        + width * DECAY_LORA_RANK + DECAY_LORA_RANK * local  # decay LoRA
        + 5 * width * local  # receptance, key, value, gate, output
        + 4 * local * head_size  # Bi-WKV: state update and read, both directions
        + local  # bonus term
    )
    channel_mix = 2 * width * (ffn_dim // tensor_parallel) + width * width
    return time_mix + channel_mix


def tower_forward_flops(config: ModelConfig, tensor_parallel: int = 1) -> dict[str, int]:
    """Forward FLOPs per sample of each tower, projection included (of one TP rank for ``tensor_parallel``)."""
    img, txt, tp = config.image, config.text, tensor_parallel
    tokens = img.num_patches + (1 if img.pool == "token" else 0)
    image_macs = img.num_patches * img.in_channels * img.patch_size ** 2 * img.width
    image_macs += tokens * img.depth * block_macs_per_token(img.width, img.ffn_dim, img.head_size, tp)
    text_macs = txt.context_length * txt.depth * block_macs_per_token(txt.width, txt.ffn_dim, txt.head_size, tp)
    if img.width != config.embed_dim:
        image_macs += img.width * config.embed_dim
    if txt.width != config.embed_dim:
        text_macs += txt.width * config.embed_dim
    return {"image": 2 * image_macs, "text": 2 * text_macs}


def forward_flops_per_sample(config: ModelConfig, tensor_parallel: int = 1) -> int:
    """Forward FLOPs of one image-text pair (on one of ``tensor_parallel`` ranks); a training step
    costs about 3x this (4x with checkpointing)."""
    return sum(tower_forward_flops(config, tensor_parallel).values())
