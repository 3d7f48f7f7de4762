#!/usr/bin/env python
"""Write the image tower of a pretrained RWKV-CLIP file as a standalone vision encoder.

    python tools/export_vision_encoder.py b32.safetensors b32_vision.safetensors [--dtype bf16]

Load it with ``rwkvclip_dist.pretrained.load_vision_encoder(path)``; calling the encoder returns
``(pooled [B, E], per-patch tokens [B, h*w, C])``, the tokens after the final LayerNorm, which a
VisualRWKV / LLaVA-style VLM projects into its language model in place of ViT features.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.outputs import Staged, check_apart, check_file_path
from rwkvclip_dist.pretrained import load_model, save_vision_encoder
from rwkvclip_dist.pretrained_format import DTYPES, parse_dtype


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export_vision_encoder.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="pretrained RWKV-CLIP .safetensors (with its JSON config)")
    parser.add_argument("dst", type=Path, help="output .safetensors (a .json config is written beside it)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    return parser


def run(args: argparse.Namespace) -> int:
    check_apart(args.dst, "dst", {"src": args.src})
    check_file_path(args.dst, "dst")
    model = load_model(None, pretrained=args.src)
    with Staged(args.dst, sidecars=(".json",)) as staged:  # renamed into place once written
        save_vision_encoder(model, staged.path, parse_dtype(args.dtype))
        staged.commit()
    print(f"wrote {args.dst} ({model.config.name} image tower, {args.dtype})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
