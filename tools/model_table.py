#!/usr/bin/env python
"""Print the README's model table: parameter counts (from the real modules, on the meta device) and
analytic forward FLOPs per image-text pair, for every registered config.

    python tools/model_table.py
"""
from __future__ import annotations

import argparse
import sys

import torch

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.model import RWKVCLIP, get_model_config, list_models
from rwkvclip_dist.model.flops import tower_forward_flops


def model_table() -> str:
    lines = [
        "| model | image: res/patch/tokens | image: depth/width/N/F | text: depth/width/N/F | embed | params (image + text) | fwd GFLOPs/pair (image + text) |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for name in sorted(list_models(), key=_size_order):
        config = get_model_config(name)
        with torch.device("meta"):
            model = RWKVCLIP(config, initialize=False)
        image = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("visual.", "visual_proj.")))
        text = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("text.", "text_proj.")))
        total = sum(p.numel() for p in model.parameters())
        flops = tower_forward_flops(config)
        img, txt = config.image, config.text
        proj = "no proj" if model.visual_proj is None and model.text_proj is None else "proj"
        lines.append(
            f"| `{name}` | {img.image_size}/{img.patch_size}/{img.num_patches} "
            f"| {img.depth}/{img.width}/{img.head_size}/{img.ffn_dim} | {txt.depth}/{txt.width}/{txt.head_size}/{txt.ffn_dim} "
            f"| {config.embed_dim}, {proj} | {total:,} ({image:,} + {text:,}) "
            f"| {(flops['image'] + flops['text']) / 1e9:.2f} ({flops['image'] / 1e9:.2f} + {flops['text'] / 1e9:.2f}) |"
        )
    return "\n".join(lines)


def _size_order(name: str) -> tuple:
    order = ["tiny", "RWKV-CLIP-B-32", "RWKV-CLIP-B-16", "RWKV-CLIP-L-14", "RWKV-CLIP-H-14", "RWKV-CLIP-g-14",
             "RWKV-CLIP-4B-14", "RWKV-CLIP-4B-14-448"]
    return (order.index(name) if name in order else len(order), name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="model_table.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    return run_tool(parser, lambda args: print(model_table()), argv)


if __name__ == "__main__":
    sys.exit(main())
