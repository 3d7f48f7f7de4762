#!/usr/bin/env python
"""Convert RWKV-CLIP checkpoints between the authors' layout, DeepSpeed ZeRO directories and ours.

    # the authors' released weights -> ours (+ check against a direct evaluation of their weights)
    python tools/convert_checkpoint.py from-authors model_31.pt b32.safetensors --model RWKV-CLIP-B-32 --verify
    # a ZeRO 1/2/3 training checkpoint (any world size, any tensor-parallel size) -> one bf16 file
    python tools/convert_checkpoint.py from-zero runs/b32/ckpt b32.safetensors --model RWKV-CLIP-B-32 --dtype bf16
    # ours -> the authors' layout, to compare with their code
    python tools/convert_checkpoint.py to-authors b32.safetensors model_31.pt --verify
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


from rwkvclip_dist.convert import pipeline
from rwkvclip_dist.pretrained_format import StateDictMismatch, parse_dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (("from-authors", "authors' state dict (.pt/.safetensors) -> ours"),
                               ("from-zero", "DeepSpeed ZeRO checkpoint directory -> ours"),
                               ("to-authors", "our .safetensors -> authors' layout (.pt)")):
        p = sub.add_parser(command, help=help_text)
        p.add_argument("src", type=Path)
        p.add_argument("dst", type=Path)
        p.add_argument("--verify", action="store_true", help="run both sides on a fixed batch, print embedding cosines")
        if command != "to-authors":
            p.add_argument("--model", help="registry name (default: the registered model the shapes match)")
            p.add_argument("--overrides", type=json.loads, default={}, help='JSON, e.g. \'{"image.depth": 6}\'')
            p.add_argument("--dtype", default="float32", help="float32 or bf16 for the written file")
        if command == "from-zero":
            p.add_argument("--tag", help="checkpoint tag (default: the 'latest' file)")
        if command == "to-authors":
            p.add_argument("--released-dtypes", action="store_true",
                           help="bf16 text decays and fp32 lerps as in the released files (rounds; not bit-exact)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "from-authors":
            config, theirs = pipeline.authors_to_ours(args.src, args.dst, args.model, parse_dtype(args.dtype), args.overrides)
            print(f"wrote {args.dst} ({config.name}, {args.dtype})")
            report = pipeline.verify_authors(args.dst, theirs) if args.verify else None
        elif args.command == "from-zero":
            config, state = pipeline.zero_to_ours(args.src, args.dst, args.model, parse_dtype(args.dtype),
                                                  args.overrides, args.tag)
            print(f"wrote {args.dst} ({config.name}, {args.dtype})")
            report = pipeline.verify_state(args.dst, state) if args.verify else None
        else:
            theirs = pipeline.ours_to_authors(args.src, args.dst, args.released_dtypes)
            print(f"wrote {args.dst} (authors' layout, {len(theirs)} tensors)")
            report = pipeline.verify_authors(args.src, theirs) if args.verify else None
    except (StateDictMismatch, FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report is not None:
        print(report.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
