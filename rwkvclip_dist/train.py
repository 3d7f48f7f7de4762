"""Train RWKV-CLIP from a recipe, on one process or many.

    deepspeed rwkvclip_dist/train.py --recipe recipes/X.yaml [--run-dir DIR] [key.sub=value ...]
    torchrun --nproc-per-node 8 rwkvclip_dist/train.py --recipe ...
    srun python rwkvclip_dist/train.py --recipe ...          (Slurm: one task per GPU)
    python rwkvclip_dist/train.py --recipe ...                (single-process debug run)

The run directory receives the resolved recipe (``recipe.yaml``), checkpoints, TensorBoard logs,
``loss_log.jsonl`` (one line per step) and, at the end, ``metrics.json``. A run resumes from the
newest complete checkpoint in its checkpoint directory unless ``checkpoint.resume=false``.
Exit statuses: ``rwkvclip_dist/training/runner.py``.
The loop itself lives in ``rwkvclip_dist.training``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Launched as a script: the package's own folder must not shadow top-level module names.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from rwkvclip_dist.cli import add_debug_flag, debug_requested, parse, user_errors  # noqa: E402
from rwkvclip_dist.outputs import strict_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe YAML file")
    parser.add_argument("--run-dir", default=None, help="output directory (default: runs/<recipe name>)")
    # The deepspeed launcher appends --local_rank=N; the environment carries the same value.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. optimizer.lr=3e-4")
    add_debug_flag(parser)
    return parse(parser, sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> dict:
    from rwkvclip_dist.parallel.launch_env import detect_launch_env
    from rwkvclip_dist.training.recipe import load_recipe
    from rwkvclip_dist.training.runner import run_training

    args = parse_args(argv)
    # A mistake in the recipe or its data ends in one line and exit status 2 on each rank (setup only:
    # an error while training keeps its traceback); training.runner maps the other endings.
    debug = args.debug or debug_requested([])
    with user_errors("train.py", debug):
        launch = detect_launch_env()
        recipe = load_recipe(args.recipe, args.overrides)
    metrics = run_training(recipe, Path(args.run_dir or Path("runs") / Path(args.recipe).stem), launch, debug)
    if launch.rank == 0:
        print(strict_json({k: v for k, v in metrics.items() if k != "evals"}), flush=True)
    return metrics


if __name__ == "__main__":
    main()
