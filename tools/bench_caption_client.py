#!/usr/bin/env python
"""Client-side ceiling of the caption and tag steps (tools/generate_captions.py) on this machine.

The steps' CLI runs in this process against the tests' stand-in chat server (an aiohttp server that
decodes every base64 image and answers at once; tests/chat_server.py), started in a
child process so that its CPU is not counted. The input is an MDS set of photo-like JPEGs; each row
costs the client reading the shard, base64-encoding the image, the HTTP round trip, the gates and the
JSONL write. A vision-language model on a GPU answers far more slowly than this stand-in, so the
figure says whether the client can ever be the bottleneck.

    python tools/bench_caption_client.py --samples 2000 --side 384 --concurrency 8 64
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rwkvclip_dist.cli import at_least, run_tool

SERVER = Path(__file__).resolve().parents[1] / "tests" / "chat_server.py"


def _serve(digests: dict[str, str], answers: dict[str, str], url: mp.Queue, stop: mp.Event) -> None:
    spec = importlib.util.spec_from_file_location("stand_in_server", SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server = module.ChatServer(delay_s=0.0).start()
    server.images, server.vision_answers = digests, answers
    url.put(server.url)
    stop.wait()
    server.stop()


def _photo(rng: np.random.Generator, side: int) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    a, b, c = rng.random(3)
    base = np.stack([a * xx + (1 - a) * yy, b * yy, c * (1 - xx)], -1) * 255
    img = (base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_caption_client.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=at_least(1), default=2000)
    p.add_argument("--side", type=at_least(1), default=384, help="JPEG side in pixels")
    p.add_argument("--concurrency", type=at_least(1), nargs="+", default=[8, 64])
    return p


def run(args: argparse.Namespace) -> int:
    from streaming import MDSWriter

    from rwkvclip_dist.descriptions.caption_cli import main as captions_main

    work = Path(tempfile.mkdtemp(prefix="bench-captions-"))
    rng = np.random.default_rng(0)
    images = {f"k{i:06d}": _photo(rng, args.side) for i in range(args.samples)}
    with MDSWriter(out=str(work / "mds"), columns={"key": "str", "jpg": "bytes", "raw": "str"}) as writer:
        for key, data in images.items():
            writer.write({"key": key, "jpg": data, "raw": "a picture"})
    digests = {hashlib.sha256(data).hexdigest(): key for key, data in images.items()}
    # One answer that passes both steps' gates: a short caption that is also a list of short tags.
    answers = {key: "a colour gradient tile, square, grain, red" for key in images}
    url_queue, stop = mp.Queue(), mp.Event()
    server = mp.Process(target=_serve, args=(digests, answers, url_queue, stop), daemon=True)
    server.start()
    url = url_queue.get(timeout=120)
    mean_kb = sum(map(len, images.values())) / len(images) / 1024
    print(f"{args.samples} JPEGs of {args.side}px (mean {mean_kb:.0f} KB) from MDS, stand-in server in a child process")
    print("| step | --concurrency | rows/s (wall) | rows per client CPU-second |")
    print("|---|---|---|---|")
    try:
        for step in ("caption", "tags"):
            for concurrency in args.concurrency:
                out = work / f"{step}_{concurrency}.jsonl"
                wall, cpu = time.perf_counter(), time.process_time()
                status = captions_main(["--step", step, "--input", str(work / "mds"), "--out", str(out),
                                        "--base-url", url, "--model", "test-model", "--no-progress",
                                        "--concurrency", str(concurrency)])  # fmt: skip
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                rows = sum(1 for _ in out.open())
                if status != 0 or rows != args.samples:
                    raise SystemExit(f"{step} at --concurrency {concurrency}: exit {status}, {rows} rows")
                print(f"| {step} | {concurrency} | {rows / wall:.0f} | {rows / cpu:.0f} |")
    finally:
        stop.set()
        server.join(10)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
