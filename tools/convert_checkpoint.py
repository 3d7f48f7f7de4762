#!/usr/bin/env python
"""Convert RWKV-CLIP checkpoints between the authors' layout, DeepSpeed ZeRO directories and ours.

    # the authors' released weights -> ours (+ check against a direct evaluation of their weights)
    python tools/convert_checkpoint.py from-authors model_31.pt b32.safetensors --model RWKV-CLIP-B-32 --verify
    # a ZeRO 1/2/3 training checkpoint (any world size, any tensor-parallel size) -> one bf16 file; a run
    # of this project's trainer records its recipe, so the architecture that was trained is taken from it
    python tools/convert_checkpoint.py from-zero runs/b32/checkpoints b32.safetensors --dtype bf16 --verify
    # ours -> the authors' layout, to compare with their code
    python tools/convert_checkpoint.py to-authors b32.safetensors model_31.pt --verify

``--verify`` exits with status 1 when the two sides' embeddings disagree (cosine below 0.999). The output
is written under a temporary name and renamed into place only once converted (and verified): a failed
conversion leaves nothing behind, and an output path that is the input is refused.

``to-authors`` refuses a model with settings the authors' layout cannot carry (their code fixes the
pooling and the norms' epsilons: ``text.pool: masked_mean``, say) unless ``--accept-loss``; such a
file, converted back with ``from-authors``, has the authors' settings, not the dropped ones (give
them again with ``--overrides``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.convert import pipeline
from rwkvclip_dist.outputs import Staged, check_apart, check_file_path
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
            p.add_argument("--accept-loss", action="store_true",
                           help="write a model whose settings the authors' layout cannot carry (e.g. text.pool "
                                "masked_mean): their code will run it with its own fixed values")
    return parser


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_apart(args.dst, "dst", {"src": args.src})
    check_file_path(args.dst, "dst")
    if args.command != "to-authors" and args.dst.suffix != ".safetensors":
        raise ValueError(f"dst {args.dst}: a pretrained file must end in .safetensors")
    # Written under a temporary name, renamed into place only once converted (and verified).
    with Staged(args.dst, sidecars=(".json",) if args.command != "to-authors" else ()) as staged:
        status, what = _convert(args, staged.path)
        if status == 0:
            staged.commit()
            print(f"wrote {args.dst} ({what})")
    return status


def _convert(args: argparse.Namespace, dst: Path) -> tuple[int, str]:
    """Convert into ``dst``; ``(exit status, description of the file)``."""
    if args.command == "from-authors":
        config, theirs = pipeline.authors_to_ours(args.src, dst, args.model, parse_dtype(args.dtype), args.overrides)
        what = f"{config.name}, {args.dtype}"
        report = pipeline.verify_authors(dst, theirs) if args.verify else None
    elif args.command == "from-zero":
        config, state = pipeline.zero_to_ours(args.src, dst, args.model, parse_dtype(args.dtype),
                                              args.overrides, args.tag, ema=args.ema)
        what = f"{config.name}, {args.dtype}"
        report = pipeline.verify_state(dst, state, config) if args.verify else None
    else:
        theirs = pipeline.ours_to_authors(args.src, dst, args.released_dtypes, args.accept_loss)
        what = f"authors' layout, {len(theirs)} tensors"
        report = pipeline.verify_authors(args.src, theirs) if args.verify else None
    if report is None:
        return 0, what
    print(report.line())
    if min(report.image_cosine, report.text_cosine) < VERIFY_MIN_COSINE:
        print(f"convert_checkpoint.py: error: verify failed: the conversion of {args.src} does not compute what "
              f"its source does (cosine below {VERIFY_MIN_COSINE}); {args.dst} was not written", file=sys.stderr)
        return 1, what
    return 0, what


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
