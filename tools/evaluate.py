#!/usr/bin/env python
"""Evaluate an RWKV-CLIP model: zero-shot classification, retrieval, linear probe.

    python tools/evaluate.py --model b32.safetensors --task zeroshot --data imagenet/val --templates imagenet
    python tools/evaluate.py --model b32.safetensors --task retrieval --annotations coco_karpathy.json \\
        --image-root coco/ --caption-prefix "a photo of "
    python tools/evaluate.py --model b32.safetensors --task linear_probe --train-data cifar10/train --data cifar10/test
    torchrun --nproc_per_node 8 tools/evaluate.py ...   # every rank encodes a shard; rank 0 writes
    python tools/evaluate.py --model b32.safetensors --suite datacomp --data-dir datacomp_eval/
    python tools/evaluate.py --model b32.safetensors --suite paper --data-dir clip_benchmark_wds/ --tasks cifar10

``--model`` is a pretrained .safetensors file (its JSON config gives the architecture) or a registry
name (random init, for smoke tests). Results go to ``--output`` (JSON; an existing file is replaced only
with ``--overwrite``) and a table on stdout. An image that cannot be decoded is left out and counted
(``unreadable_images`` in the results), not the end of the evaluation.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rwkvclip_dist.cli import at_least, run_tool
from rwkvclip_dist.outputs import check_apart, check_file_path, refuse_existing
from rwkvclip_dist.eval.features import LoaderConfig
from rwkvclip_dist.eval.linear_probe import LinearProbeConfig
from rwkvclip_dist.eval.runner import TASKS, EvalConfig, Evaluator, format_table, write_results
from rwkvclip_dist.eval.suite import SUITES, get_suite
from rwkvclip_dist.eval.suite_runner import evaluate_suite
from rwkvclip_dist.parallel.collectives import is_distributed, rank
from rwkvclip_dist.parallel.engine import init_process_group
from rwkvclip_dist.parallel.launch_env import detect_launch_env
from rwkvclip_dist.pretrained import create_model_and_transforms, get_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pretrained .safetensors file or registry name")
    p.add_argument("--task", action="append", choices=TASKS, help="repeatable (or --suite)")
    p.add_argument("--suite", choices=sorted(SUITES), help="DataComp's 38 tasks or the paper's protocol")
    p.add_argument("--data-dir", help="--suite: the directory of the wds_<task> folders")
    p.add_argument("--tasks", help="--suite: comma-separated task keys or names to run (default: all)")
    p.add_argument("--output-prefix", help="--suite: PREFIX.jsonl/.json/.md (default: beside --model)")
    p.add_argument("--data", help="labelled test images: image folder or labelled MDS directory")
    p.add_argument("--train-data", help="labelled training images (linear_probe)")
    p.add_argument("--templates", default="imagenet", help="shipped template set or JSON file")
    p.add_argument("--classnames", help="text file, one class name per line in label order")
    p.add_argument("--annotations", help="retrieval caption JSON (COCO, Karpathy or flat)")
    p.add_argument("--image-root", help="directory of the retrieval images")
    p.add_argument("--split", default="test", help="Karpathy split (retrieval)")
    p.add_argument("--caption-prefix", default="", help='e.g. "a photo of " (the paper\'s retrieval setting)')
    p.add_argument("--probe-backend", choices=("torch", "sklearn"), default="torch")
    p.add_argument("--probe-max-iter", type=at_least(1), default=500, help="L-BFGS iterations per probe fit")
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--workers", type=at_least(0), default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="eval_results.json", help="results JSON (an existing one needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return p


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return device


def _pretrained_file(model: str) -> bool:
    """Whether ``--model`` names a file rather than a registry model."""
    if model.endswith(".safetensors"):
        return True
    if Path(model).suffix in (".pt", ".pth", ".bin", ".ckpt") or os.path.exists(model):
        raise ValueError(f"--model {model}: pretrained files are .safetensors; convert a checkpoint with "
                         f"tools/convert_checkpoint.py (from-authors or from-zero)")
    return False


def _load(args: argparse.Namespace, device: torch.device):
    is_file = _pretrained_file(args.model)
    model, _, eval_tf = create_model_and_transforms(None if is_file else args.model,
                                                    pretrained=args.model if is_file else None, device=device)
    return model, eval_tf, get_tokenizer(args.model)


def run(args: argparse.Namespace) -> int:
    if bool(args.suite) == bool(args.task):
        raise ValueError("give either --task (repeatable) or --suite")
    if args.suite and not args.data_dir:
        raise ValueError("--suite needs --data-dir")
    device = _device(args.device)
    launch = detect_launch_env()  # torchrun, the deepspeed launcher or srun, as for training
    if launch.world_size > 1:
        init_process_group(launch, "nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", launch.local_rank)
    try:
        return _evaluate(args, device)
    finally:
        if is_distributed():
            dist.destroy_process_group()


def _evaluate(args: argparse.Namespace, device: torch.device) -> int:
    if args.suite:
        _pretrained_file(args.model)  # a wrong --model fails before the data is planned
        evaluate_suite(get_suite(args.suite), args.tasks.split(",") if args.tasks else None, args.data_dir,
                       args.model, args.output_prefix, lambda: _load(args, device),
                       LoaderConfig(args.batch_size, args.workers),
                       LinearProbeConfig(backend=args.probe_backend, max_iter=args.probe_max_iter), device)
        return 0
    config = EvalConfig(tasks=args.task, data=args.data, train_data=args.train_data, templates=args.templates,
                        classnames=args.classnames, annotations=args.annotations, image_root=args.image_root,
                        split=args.split, caption_prefix=args.caption_prefix,
                        loader=LoaderConfig(args.batch_size, args.workers),
                        probe=LinearProbeConfig(backend=args.probe_backend, max_iter=args.probe_max_iter))
    config.check()  # a wrong path or template set fails now, not after the model has encoded the images
    check_apart(args.output, "--output", {"--model": args.model if os.path.exists(args.model) else None,
                                          "--data": args.data, "--train-data": args.train_data,
                                          "--annotations": args.annotations, "--image-root": args.image_root,
                                          "--classnames": args.classnames, "--templates": args.templates
                                          if os.path.exists(args.templates) else None})
    check_file_path(args.output, "--output")
    refuse_existing(args.output, "--output", args.overwrite, "the results of an earlier evaluation")
    model, eval_tf, tokenizer = _load(args, device)
    results = Evaluator(model, eval_tf, tokenizer, config, device).run()
    if rank() == 0:
        write_results(results, config, args.output, args.model)
        print(format_table(results))
        print(f"results written to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
