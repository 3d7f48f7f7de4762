"""Command line of tools/generate_captions.py: the synthetic-caption and tag steps (captions.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.descriptions.bookkeeping import RunStats
from rwkvclip_dist.descriptions.captions import load_task
from rwkvclip_dist.descriptions.client import ServerError
from rwkvclip_dist.descriptions.cli import add_run_args, execute, finish
from rwkvclip_dist.descriptions.quality import MAX_TEXT_TOKENS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_captions.py",
        description="Write synthetic captions (--step caption) or detection-style tags (--step tags) for the "
        "images of an MDS dataset or JSONL file with a vision-language model; resumable, shardable, output "
        "read by generate_descriptions.py --captions and make_shards.py --captions.",
    )
    p.add_argument("--step", required=True, choices=("caption", "tags"), help="what to write per image")
    add_run_args(p, "output JSONL {key, synthetic|tags, model, prompt_version}",
                 "key, image (MDS column) or image_path (JSONL field)")  # fmt: skip
    p.add_argument("--prompt", type=Path, help="instruction file (default prompts/<step>/v1.txt; stem = version)")
    p.add_argument(
        "--max-text-tokens", type=int, default=MAX_TEXT_TOKENS,
        help=f"caption step: CLIP BPE tokens a caption may have (default {MAX_TEXT_TOKENS}: the 77-token context)",
    )  # fmt: skip
    p.add_argument("--max-tags", type=int, default=20, help="tags step: keep the first N tags (default 20)")
    return p


def run(args: argparse.Namespace) -> int:
    def work() -> RunStats:
        if args.max_tags < 1:
            raise ValueError(f"--max-tags must be at least 1, got {args.max_tags}")
        options = {"max_text_tokens": args.max_text_tokens} if args.step == "caption" else {"max_tags": args.max_tags}
        return execute(args, load_task(args.step, args.prompt, **options))

    return finish(args, work)


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv, extra=(ServerError,))
