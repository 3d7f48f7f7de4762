"""Step-time stall of a checkpoint save and its upload to an object store, upload in the step loop
against upload in the background (``checkpoint.remote``; rwkvclip_dist/checkpoint/remote.py).

    python tools/bench_checkpoint_upload.py                      # B/32 shape, writes benchmarks/checkpoint_upload.md
    python tools/bench_checkpoint_upload.py --model tiny --out /tmp/x.md

One process, DeepSpeed ZeRO-1 in fp32 on gloo (the CPU setup of the tests), the model's real
training step (forward of both towers, the project's contrastive loss, backward, AdamW) on a small
batch, and a real S3 API server on 127.0.0.1 (moto, rwkvclip_dist/data/local_s3.py). Each mode trains
``--steps`` steps and saves once, after step ``--save-at``:

- ``inline``: save, then upload before the next step (what a sync loop in the step loop does);
- ``background``: save, then hand the checkpoint to ``checkpoint.remote.Uploader`` and go on.

Reported per mode: the median step without a save, the save step's extra time, and the stall =
the sum over the save step and every step after it of (step time - median), i.e. how much later
training ends because of the checkpoint. Both modes run in the same process on the same machine.
"""
from __future__ import annotations

import argparse
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rwkvclip_dist.cli import run_tool

REPO = Path(__file__).resolve().parent.parent


def _engine(model_name: str, batch: int):
    from rwkvclip_dist import create_model
    from rwkvclip_dist.loss import ClipLoss
    from rwkvclip_dist.parallel.engine import ParallelSection, create_engine, deepspeed_config, init_distributed
    from rwkvclip_dist.parallel.launch_env import detect_launch_env
    from rwkvclip_dist.training.optim import OptimizerSection, build_optimizer

    launch = detect_launch_env()
    init_distributed(launch, "gloo")
    torch.manual_seed(0)
    model = create_model(model_name)
    optimizer = build_optimizer(model, OptimizerSection(lr=1e-4), torch.device("cpu"))
    engine = create_engine(model, optimizer, deepspeed_config(
        ParallelSection(zero_stage=1, precision="fp32"), micro_batch=batch, accumulation_steps=1,
        world_size=1, grad_clip=1.0))
    cfg = model.config
    images = torch.randn(batch, 3, cfg.image.image_size, cfg.image.image_size)
    tokens = torch.randint(1, 1000, (batch, cfg.text.context_length))
    loss_fn = ClipLoss()

    def step() -> None:
        out = engine(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        engine.backward(loss)
        engine.step()

    return engine, step


def _run_mode(mode: str, engine, step, directory: Path, url: str, steps: int, save_at: int) -> dict:
    from rwkvclip_dist.checkpoint.manager import CLIENT_FILE, CheckpointManager
    from rwkvclip_dist.checkpoint.remote import RemoteCheckpoints

    manager = CheckpointManager(directory, keep_last=1, remote=url if mode == "background" else "")
    remote = RemoteCheckpoints(url, CLIENT_FILE)
    times, save_s, upload_s = [], 0.0, 0.0
    for index in range(1, steps + 1):
        start = time.perf_counter()
        step()
        if index == save_at:
            begin = time.perf_counter()
            tag = manager.save(engine, index, {}, {"step": index, "world_size": 1})
            save_s = time.perf_counter() - begin
            if mode == "inline":
                begin = time.perf_counter()
                remote.upload(directory / tag)
                upload_s = time.perf_counter() - begin
        times.append(time.perf_counter() - start)
    waited = time.perf_counter()
    manager.close()  # the background upload still running at the end of the run
    tail_wait = time.perf_counter() - waited
    quiet = statistics.median(times[:save_at - 1])
    stall = sum(t - quiet for t in times[save_at - 1:]) + tail_wait
    size = sum(p.stat().st_size for p in (directory / tag).rglob("*") if p.is_file())
    return {"mode": mode, "median_step_s": quiet, "save_s": save_s, "inline_upload_s": upload_s,
            "save_step_s": times[save_at - 1], "steps_after": times[save_at:], "end_wait_s": tail_wait,
            "stall_s": stall, "bytes": size}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_checkpoint_upload.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="RWKV-CLIP-B-32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-at", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "checkpoint_upload.md"))
    return parser


def run(args: argparse.Namespace) -> int:

    import os

    from rwkvclip_dist.data.local_s3 import LocalS3Server

    with tempfile.TemporaryDirectory() as tmp, LocalS3Server(Path(tmp) / "s3.log") as s3:
        os.environ.update(s3.env)
        s3.client().create_bucket(Bucket="bench")
        engine, step = _engine(args.model, args.batch)
        rows = []
        for mode in ("inline", "background"):
            rows.append(_run_mode(mode, engine, step, Path(tmp) / mode, f"s3://bench/{mode}", args.steps,
                                  args.save_at))
    lines = [
        f"# Step stall of a checkpoint save and its upload ({args.model}, batch {args.batch}, 1 CPU rank, "
        f"ZeRO-1 fp32, moto S3 on 127.0.0.1)",
        "",
        "Regenerate: `python tools/bench_checkpoint_upload.py` (see its docstring for what is measured).",
        "",
        "| upload | checkpoint | median step | save | upload in loop | save step | steps after the save | "
        "wait at end | stall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        after = " ".join(f"{t:.2f}" for t in r["steps_after"])
        lines.append(f"| {r['mode']} | {r['bytes'] / 2**30:.2f} GiB | {r['median_step_s']:.2f} s | {r['save_s']:.2f} s | "
                     f"{r['inline_upload_s']:.2f} s | {r['save_step_s']:.2f} s | {after} | {r['end_wait_s']:.2f} s | "
                     f"**{r['stall_s']:.2f} s** |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0



def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
