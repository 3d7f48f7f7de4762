#!/usr/bin/env python
"""Average pretrained RWKV-CLIP files of the same architecture ("model soups").

    python tools/average_checkpoints.py a.safetensors b.safetensors c.safetensors --out soup.safetensors
    python tools/average_checkpoints.py a.safetensors b.safetensors --weights 0.7 0.3 --out soup.safetensors

Every input must be a pretrained file (``tools/convert_checkpoint.py`` writes them from a run) with
the same architecture (config) and the same keys and shapes; anything else is refused with one line
naming the first file that differs, before anything is written. The weights (default: uniform) must
be positive; they are normalised to sum to 1. The average is taken in float64 and written in the
``--dtype`` asked for (default float32), with the architecture's JSON beside it. The output must not
be one of the inputs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.pretrained_format import (DTYPES, config_record, load_state_dict_file, parse_dtype, read_config,
                                             save_safetensors, state_dict_problems)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="average_checkpoints.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, nargs="+", help="pretrained .safetensors files (with their JSON)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors (a .json is written beside it)")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per input (default: uniform)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    return parser


def average(paths: list[Path], weights: list[float] | None = None):
    """``(config, averaged state dict)``; raises ValueError naming the first mismatched input."""
    if len(paths) < 2:
        raise ValueError("give at least two files to average")
    weights = weights or [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ValueError(f"--weights: {len(weights)} weights for {len(paths)} files")
    if not all(w > 0 for w in weights):
        raise ValueError(f"--weights must all be > 0, got {weights}")
    config = read_config(paths[0])
    first = load_state_dict_file(paths[0])
    total = {k: v.double() * weights[0] for k, v in first.items()}
    for path, weight in zip(paths[1:], weights[1:]):
        other = read_config(path)
        if other.to_dict() != config.to_dict():
            diff = sorted(k for k, v in _flat(other.to_dict()).items() if _flat(config.to_dict()).get(k) != v)
            raise ValueError(f"{path}: architecture differs from {paths[0]} ({', '.join(diff)}); only files of the "
                             f"same architecture can be averaged")
        state = load_state_dict_file(path)
        problems = state_dict_problems({k: v.shape for k, v in first.items()}, state)
        if any(problems.values()):
            what = "; ".join(f"{len(v)} {k}" for k, v in problems.items() if v)
            raise ValueError(f"{path}: keys differ from {paths[0]} ({what}); only files of the same architecture "
                             f"can be averaged")
        for key, value in state.items():
            total[key] += value.double() * weight
    scale = 1.0 / sum(weights)
    return config, {k: v * scale for k, v in total.items()}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run(args: argparse.Namespace) -> int:
    if args.out.resolve() in {p.resolve() for p in args.inputs}:
        raise ValueError(f"--out {args.out} is one of the inputs; write the average to a new file")
    config, state = average(args.inputs, args.weights)
    dtype = parse_dtype(args.dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path = save_safetensors(state, args.out, config_record(config, "clip", dtype))
    print(f"wrote {path}: average of {len(args.inputs)} {config.name} files (weights "
          f"{args.weights or 'uniform'}), {args.dtype}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
