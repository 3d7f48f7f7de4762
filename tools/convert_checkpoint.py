#!/usr/bin/env python
"""Convert RWKV-CLIP checkpoints between the authors' layout, DeepSpeed ZeRO directories and ours.

    # the authors' released weights -> ours (+ check against a direct evaluation of their weights)
    python tools/convert_checkpoint.py from-authors model_31.pt b32.safetensors --model RWKV-CLIP-B-32 --verify
    # a ZeRO 1/2/3 training checkpoint (any world size, any tensor-parallel size) -> one bf16 file; a run
    # of this project's trainer records its recipe, so the architecture that was trained is taken from it
    python tools/convert_checkpoint.py from-zero runs/b32/checkpoints b32.safetensors --dtype bf16 --verify
    # ours -> the authors' layout, to compare with their code
    python tools/convert_checkpoint.py to-authors b32.safetensors model_31.pt --verify

``--verify`` exits with status 1 when the two sides' embeddings disagree (cosine below 0.999).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.convert import pipeline
from rwkvclip_dist.pretrained_format import DTYPES, parse_dtype

VERIFY_MIN_COSINE = 0.999  # bf16 rounding of a trained model stays above 0.9999; a wrong architecture is far below


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}; e.g. '{{\"image.depth\": 6}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of dotted keys, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (("from-authors", "authors' state dict (.pt/.safetensors) -> ours"),
                               ("from-zero", "DeepSpeed ZeRO checkpoint directory -> ours"),
                               ("to-authors", "our .safetensors -> authors' layout (.pt)")):
        p = sub.add_parser(command, help=help_text)
        p.add_argument("src", type=Path)
        p.add_argument("dst", type=Path)
        p.add_argument("--verify", action="store_true",
                       help="run both sides on a fixed batch, print embedding cosines (exit 1 below 0.999)")
        if command != "to-authors":
            p.add_argument("--model", help="registry name (default: the recorded recipe's, else the model the "
                                           "shapes match)")
            p.add_argument("--overrides", type=json_object, default={}, help='JSON, e.g. \'{"image.depth": 6}\'')
            p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the written file")
        if command == "from-zero":
            p.add_argument("--tag", help="checkpoint tag, e.g. step_00000400 (default: the 'latest' file)")
            p.add_argument("--ema", action="store_true", help="write the run's EMA of the weights (train.ema)")
        if command == "to-authors":
            p.add_argument("--released-dtypes", action="store_true",
                           help="bf16 text decays and fp32 lerps as in the released files (rounds; not bit-exact)")
    return parser


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "from-authors":
        config, theirs = pipeline.authors_to_ours(args.src, args.dst, args.model, parse_dtype(args.dtype), args.overrides)
        print(f"wrote {args.dst} ({config.name}, {args.dtype})")
        report = pipeline.verify_authors(args.dst, theirs) if args.verify else None
    elif args.command == "from-zero":
        config, state = pipeline.zero_to_ours(args.src, args.dst, args.model, parse_dtype(args.dtype),
                                              args.overrides, args.tag, ema=args.ema)
        print(f"wrote {args.dst} ({config.name}, {args.dtype})")
        report = pipeline.verify_state(args.dst, state, config) if args.verify else None
    else:
        theirs = pipeline.ours_to_authors(args.src, args.dst, args.released_dtypes)
        print(f"wrote {args.dst} (authors' layout, {len(theirs)} tensors)")
        report = pipeline.verify_authors(args.src, theirs) if args.verify else None
    if report is None:
        return 0
    print(report.line())
    if min(report.image_cosine, report.text_cosine) < VERIFY_MIN_COSINE:
        print(f"convert_checkpoint.py: error: verify failed: {args.dst} does not compute what its source does "
              f"(cosine below {VERIFY_MIN_COSINE})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
