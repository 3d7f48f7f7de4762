#!/usr/bin/env python
"""Write a Hugging Face model repository folder for a trained RWKV-CLIP model.

    python tools/export_hub.py runs/b32 hub/rwkvclip-b32            # a run: its newest complete checkpoint
    python tools/export_hub.py b32.safetensors hub/rwkvclip-b32     # a pretrained file
    python tools/export_hub.py runs/b32 hub/rwkvclip-b32 --push ORG/rwkvclip-b32

The folder holds ``rwkvclip.safetensors`` + ``rwkvclip.json`` (the pretrained format), a
``tokenizer_config.json`` and a ``README.md`` model card: the architecture, a summary of the training
data and steps, the recipe, and the evaluation table of the run's ``metrics.json``. Load it with
``create_model_and_transforms("hf-hub:ORG/NAME")`` once pushed. ``--push`` uploads the folder with
``huggingface_hub`` (needs the network and a token; not tested here, where there is no network).
OUT_DIR must not exist (nothing is written over).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.hub import RECORD_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from rwkvclip_dist.pretrained_format import read_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export_hub.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a run directory or a pretrained .safetensors")
    parser.add_argument("out", type=Path, help="the repository folder to create")
    parser.add_argument("--push", metavar="REPO_ID", help="upload the folder to this Hub repository")
    return parser


def _run_files(run: Path) -> tuple[dict, dict]:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else {}
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    return recipe, metrics


def model_card(config, recipe: dict, metrics: dict, source: str) -> str:
    lines = ["---", "library_name: rwkvclip_dist", "tags: [clip, rwkv, zero-shot-image-classification]", "---",
             f"# {config.name or 'RWKV-CLIP'}", "", f"RWKV-CLIP exported from `{source}` by `tools/export_hub.py`.",
             "", "```python", "from rwkvclip_dist.pretrained import create_model_and_transforms, get_tokenizer",
             'model, _, preprocess = create_model_and_transforms("hf-hub:ORG/NAME")', "```", "", "## Architecture", "",
             f"- image tower: {config.image.image_size} px, patch {config.image.patch_size}, width {config.image.width}, "
             f"depth {config.image.depth}", f"- text tower: width {config.text.width}, depth {config.text.depth}, "
             f"context {config.text.context_length}", f"- embedding dimension {config.embed_dim}", ""]
    if recipe:
        data, train = recipe.get("data", {}), recipe.get("train", {})
        streams = ", ".join(str(s.get("remote")) for s in data.get("streams", []))
        lines += ["## Training data", "", f"- streams: {streams}", f"- steps: {metrics.get('steps', train.get('steps'))}, "
                  f"samples seen: {metrics.get('samples', 'unknown')}", ""]
    evals = metrics.get("evals") or {}
    if evals:
        names = sorted({k for results in evals.values() for k in results})
        lines += ["## Evaluation", "", "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for step in sorted(evals, key=int):
            lines.append(f"| {step} | " + " | ".join(f"{evals[step].get(n, float('nan')):.4f}" for n in names) + " |")
        lines.append("")
    if recipe:
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from rwkvclip_dist.convert import pipeline

    if args.out.exists():
        raise ValueError(f"{args.out} exists; export into a new folder")
    if not args.src.exists():
        raise FileNotFoundError(f"{args.src} does not exist")
    recipe, metrics = _run_files(args.src) if args.src.is_dir() else ({}, {})
    scratch = args.out.with_name(args.out.name + ".partial")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    weights = scratch / WEIGHTS_FILE
    if args.src.is_dir():
        checkpoints = args.src / "checkpoints" if (args.src / "checkpoints").is_dir() else args.src
        pipeline.zero_to_ours(checkpoints, weights)
    else:
        shutil.copyfile(args.src, weights)
        shutil.copyfile(args.src.with_suffix(".json"), scratch / RECORD_FILE)
    config = read_config(weights)
    (scratch / TOKENIZER_FILE).write_text(json.dumps({
        "tokenizer": "CLIP BPE (openai/clip-vit-base-patch32 vocabulary, rwkvclip_dist.data.tokenizer)",
        "context_length": config.text.context_length, "start_token_id": 49406,
        "end_token_id": config.text.end_token_id}, indent=1, allow_nan=False) + "\n")
    (scratch / "README.md").write_text(model_card(config, recipe, metrics, str(args.src)))
    scratch.rename(args.out)  # a failed export leaves no half-written repository folder
    print(f"wrote {args.out}: {config.name} ({', '.join(sorted(p.name for p in args.out.iterdir()))})")
    if args.push:
        from huggingface_hub import HfApi

        HfApi().upload_folder(repo_id=args.push, folder_path=str(args.out), repo_type="model")
        print(f"pushed to https://huggingface.co/{args.push}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
