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

Reported per mode: the median step without a save; the time the checkpoint held the loop, timed
directly (the save, the upload in the loop, the wait for the upload at the end); and the stall =
the sum over the save step and every step after it of (step time - median), i.e. how much later
training ends because of the checkpoint (it also counts a background upload's competition for the
cores). One step-time difference is at the mercy of whatever else runs on the machine, so the two
modes alternate ``--repeat`` times in the same process (one engine) and every column is the median
over the repeats, with the spread (min-max) of the two that matter. The 1-minute load average before
and after goes into the file: on a shared machine it says how far to trust the step times.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
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
    from rwkvclip_dist.checkpoint.record import RunRecord
    from rwkvclip_dist.checkpoint.remote import RemoteCheckpoints

    manager = CheckpointManager(directory, keep_last=1, remote=url if mode == "background" else "")
    remote = RemoteCheckpoints(url, CLIENT_FILE)
    times, save_s, upload_s = [], 0.0, 0.0
    for index in range(1, steps + 1):
        start = time.perf_counter()
        step()
        if index == save_at:
            begin = time.perf_counter()
            tag = manager.save(engine, {}, RunRecord(step=index, world_size=1))
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
            "held_s": save_s + upload_s + tail_wait, "stall_s": stall, "bytes": size}


def _summary(runs: list[dict]) -> dict:
    """Medians over the repeats of one mode; ``*_range``: (min, max) of the held time and the stall."""
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0] if isinstance(runs[0][key], (int, float))}
    out["steps_after"] = [statistics.median(col) for col in zip(*(r["steps_after"] for r in runs))]
    for key in ("held_s", "stall_s"):
        out[key + "_range"] = (min(r[key] for r in runs), max(r[key] for r in runs))
    return {**out, "mode": runs[0]["mode"], "runs": len(runs)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_checkpoint_upload.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="RWKV-CLIP-B-32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-at", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each mode, alternating")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "checkpoint_upload.md"))
    return parser


def run(args: argparse.Namespace) -> int:
    from rwkvclip_dist.data.local_s3 import LocalS3Server

    with tempfile.TemporaryDirectory() as tmp, LocalS3Server(Path(tmp) / "s3.log") as s3:
        os.environ.update(s3.env)
        client = s3.client()
        client.create_bucket(Bucket="bench")
        engine, step = _engine(args.model, args.batch)
        load_before = os.getloadavg()[0]
        runs: dict[str, list[dict]] = {"inline": [], "background": []}
        for repeat in range(args.repeat):
            for mode in runs:
                runs[mode].append(_run_mode(mode, engine, step, Path(tmp) / f"{mode}{repeat}",
                                            f"s3://bench/{mode}{repeat}", args.steps, args.save_at))
                # 2 GiB each at B/32, on disk and in the S3 server: gone before the next run.
                shutil.rmtree(Path(tmp) / f"{mode}{repeat}")
                for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=f"{mode}{repeat}/"):
                    keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                    if keys:
                        client.delete_objects(Bucket="bench", Delete={"Objects": keys})
        load_after = os.getloadavg()[0]
        rows = [_summary(r) for r in runs.values()]
    lines = [
        f"# Step stall of a checkpoint save and its upload ({args.model}, batch {args.batch}, 1 CPU rank, "
        f"ZeRO-1 fp32, moto S3 on 127.0.0.1)",
        "",
        "Regenerate: `python tools/bench_checkpoint_upload.py` (see its docstring for what is measured). This "
        f"run: `python tools/bench_checkpoint_upload.py {' '.join(sys.argv[1:])}`, {os.cpu_count()} cores, "
        f"1-minute load average {load_before:.1f} before and {load_after:.1f} after.",
        "",
        f"Medians over {args.repeat} runs of each mode (alternating), min-max in brackets.",
        "",
        "| upload | checkpoint | median step | save | upload in loop | wait at end | **held the loop** | save step | "
        "steps after the save | stall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        after = " ".join(f"{t:.2f}" for t in r["steps_after"])
        held, stall = r["held_s_range"], r["stall_s_range"]
        lines.append(f"| {r['mode']} | {r['bytes'] / 2**30:.2f} GiB | {r['median_step_s']:.2f} s | {r['save_s']:.2f} s | "
                     f"{r['inline_upload_s']:.2f} s | {r['end_wait_s']:.2f} s | **{r['held_s']:.2f} s** ({held[0]:.2f}-"
                     f"{held[1]:.2f}) | {r['save_step_s']:.2f} s | {after} | {r['stall_s']:.2f} s ({stall[0]:.2f}-"
                     f"{stall[1]:.2f}) |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0



def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
