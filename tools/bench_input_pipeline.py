#!/usr/bin/env python
"""Input-pipeline throughput per core: our MDS loader vs an equivalent webdataset pipeline.

Both read the same JPEGs and do the same work per sample (JPEG decode, SPEC training transform,
CLIP tokenization, batching) with one torch thread per process, so samples per CPU-second (the main
process plus its DataLoader workers) is samples/s per core. Results go in benchmarks/input_pipeline.md.

    python tools/bench_input_pipeline.py --samples 2048 --image-side 320 --image-size 224 --repeats 3
    python tools/bench_input_pipeline.py --workers 2      # DataLoader workers, as in training
    python tools/bench_input_pipeline.py --object-store   # also from S3 (moto_server on 127.0.0.1)
    python tools/bench_input_pipeline.py --image-sides 512 1024   # LAION-like sources, random sizes

The "mds (ours), full decode" row is our loader with the torchvision transform on fully decoded
images (the loader before reduced-scale JPEG decoding); webdataset and the stock StreamingDataset
use that same transform, as their users would.

webdataset is needed for the comparison only, moto[server] for --object-store (the bench extra).
With --object-store the same samples are also built into smaller shards (--store-shard-mb) and read
from local disk and through an S3 server with a fresh local cache per run (download, zstd
decompression and eviction included); the server is a separate process whose CPU is not counted,
as a remote store's would not be.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np

from rwkvclip_dist.cli import run_tool



def make_tars(paths: list[str], n: int, sides: tuple[int, int]) -> None:
    """Photo-like JPEGs (smooth gradients plus mild noise; pure noise would inflate decode cost),
    width and height each uniform in ``sides``, samples 0..n-1 split into consecutive blocks, one
    per tar (webdataset gives each worker whole tars)."""
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, n, len(paths) + 1).astype(int)
    for path, first, end in zip(paths, bounds[:-1], bounds[1:]):
        with tarfile.open(path, "w") as tar:
            _write_samples(tar, rng, sides, range(first, end))


def _write_samples(tar, rng, sides, ids) -> None:
    from PIL import Image
    for i in ids:
        w, h = rng.integers(sides[0], sides[1] + 1, size=2)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        xx, yy = xx / w, yy / h
        a, b, c = rng.random(3)
        base = np.stack([a * xx + (1 - a) * yy, b * yy, c * (1 - xx)], -1) * 255
        img = (base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        text = f"a synthetic gradient picture number {i} with colours {a:.2f} {b:.2f} {c:.2f}"
        for ext, data in (("jpg", buf.getvalue()), ("txt", text.encode()),
                          ("json", json.dumps({"key": f"{i:06d}"}, allow_nan=False).encode())):
            info = tarfile.TarInfo(f"{i:06d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def timed(loader) -> tuple[int, float, float, float]:
    """(samples, wall s, CPU s of the process with its background threads and its finished DataLoader
    workers, main-thread CPU s)."""
    n, wall, cpu, main_cpu = 0, time.perf_counter(), time.process_time() + _children_cpu(), time.thread_time()
    for batch in loader:
        n += len(batch[0])
    del loader  # workers are joined (and their CPU time counted) when the iterator is gone
    return (n, time.perf_counter() - wall, time.process_time() + _children_cpu() - cpu,
            time.thread_time() - main_cpu)


def ours(mds: str, image_size: int, batch: int, workers: int, full_decode: bool = False):
    from rwkvclip_dist.data.config import DataConfig, StreamConfig
    from rwkvclip_dist.data.loader import build_train_dataloader
    from rwkvclip_dist.data.transforms import reference_train_transform
    cfg = DataConfig(streams=[StreamConfig(remote=mds)], batch_size=batch, num_workers=workers,
                     text_weights={"raw": 1.0})
    loader, dataset = build_train_dataloader(cfg, image_size, seed=0)
    if full_decode:
        dataset.transform = reference_train_transform(image_size)
    return loader


def stock_streaming(mds: str, image_size: int, batch: int, workers: int):
    """Stock StreamingDataset with the same decode, to separate Streaming's cost from ours."""
    import torch
    from PIL import Image
    from streaming import StreamingDataset

    from rwkvclip_dist.data.tokenizer import tokenize
    from rwkvclip_dist.data.transforms import reference_train_transform
    tf = reference_train_transform(image_size)

    class Plain(StreamingDataset):
        def get_item(self, sample_id: int, retry: int = 7):
            row = super().get_item(sample_id, retry)
            img = Image.open(io.BytesIO(row["jpg"]))
            img.load()
            return tf(img), tokenize(row["raw"])[0]

    ds = Plain(local=mds, batch_size=batch, shuffle=True)
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)


def webdataset_loader(tars: list[str], image_size: int, batch: int, workers: int):
    import torch
    import webdataset as wds

    from rwkvclip_dist.data.tokenizer import tokenize
    from rwkvclip_dist.data.transforms import reference_train_transform
    tf = reference_train_transform(image_size)
    ds = (wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("jpg", "txt")
          .map_tuple(tf, lambda t: tokenize(t)[0]))
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)


def ours_remote(remote: str, image_size: int, batch: int, workers: int, cache_limit: str | None = None,
                shuffle_block_size: int | None = None):
    """Our loader over ``remote`` with a fresh local cache, removed when the loader is gone."""
    import shutil
    import weakref

    from rwkvclip_dist.data.config import DataConfig, StreamConfig
    from rwkvclip_dist.data.loader import build_train_dataloader
    cache = tempfile.mkdtemp(prefix="bench-cache-")
    cfg = DataConfig(streams=[StreamConfig(remote=remote, local=cache)], batch_size=batch,
                     num_workers=workers, text_weights={"raw": 1.0}, cache_limit=cache_limit,
                     shuffle_block_size=shuffle_block_size)
    loader = build_train_dataloader(cfg, image_size, seed=0)[0]
    weakref.finalize(loader, shutil.rmtree, cache, ignore_errors=True)
    return loader


def object_store_pipelines(args, tars: list[str], work: str, shape: tuple, stack) -> tuple[dict, object]:
    """Rows reading the same samples in --store-shard-mb shards: local disk, S3 cold cache, S3 with a
    cache of about a quarter of the data (shards evicted and fetched again) under Streaming's default
    shuffle block and under one that fits the cache; and the server, to count shard downloads."""
    from rwkvclip_dist.data.shards.builder import BuildOptions, build_shards
    from rwkvclip_dist.data.local_s3 import LocalS3Server
    small = os.path.join(os.path.dirname(tars[0]), f"mds_{args.store_shard_mb}mb")
    if not os.path.exists(os.path.join(small, "index.json")):
        build_shards(BuildOptions(inputs=tars, out=small, workers=1, size_limit=args.store_shard_mb << 20))
    shards = json.load(open(os.path.join(small, "index.json")))["shards"]
    raw = [s["raw_data"]["bytes"] for s in shards]
    # Streaming wants room for 4 shards, each counted raw plus compressed; below the data set's size
    # so that shards are evicted.
    limit = max(sum(raw) // 4, 4 * max(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in shards) + 1)
    if limit >= sum(raw):
        raise SystemExit(f"--store-shard-mb {args.store_shard_mb}: {len(shards)} shards are too few for a cache "
                         f"below the data set's size; use smaller shards or more --samples")
    s3 = stack.enter_context(LocalS3Server(os.path.join(work, "moto_server.log")))
    os.environ.update(s3.env)
    remote = s3.upload(small, "bench", "mds")
    tag = f"{len(shards)} shards of {args.store_shard_mb} MB"
    capped = f"mds (ours), {tag}, S3, cache_limit {limit / 2**20:.0f} MB of {sum(raw) / 2**20:.0f} MB"
    block = limit * args.samples // sum(raw) // 2  # half the samples the cache holds
    return {f"mds (ours), {tag}, local disk": lambda: ours(small, *shape),
            f"mds (ours), {tag}, S3 on 127.0.0.1, cold cache": lambda: ours_remote(remote, *shape),
            f"{capped}, default shuffle block": lambda: ours_remote(remote, *shape, cache_limit=str(limit)),
            f"{capped}, shuffle_block_size {block}":
                lambda: ours_remote(remote, *shape, cache_limit=str(limit), shuffle_block_size=block)}, s3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_input_pipeline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=2048,
                   help="a multiple of --batch: our loader drops a last partial batch (drop_last)")
    p.add_argument("--image-side", type=int, default=320, help="stored JPEG side in pixels (square)")
    p.add_argument("--image-sides", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="LAION-like sources instead: width and height each uniform in [MIN, MAX] px")
    p.add_argument("--image-size", type=int, default=224, help="model resolution (crop size)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per pipeline")
    p.add_argument("--workdir", default=None)
    p.add_argument("--object-store", action="store_true",
                   help="add rows read through an S3 server (moto_server on 127.0.0.1)")
    p.add_argument("--store-shard-mb", type=int, default=4, help="shard size of the --object-store rows")
    return p


def run(args: argparse.Namespace) -> int:
    if args.samples % args.batch:
        raise ValueError("--samples must be a multiple of --batch so both pipelines count the same samples")

    import torch
    from streaming.base.util import clean_stale_shared_memory

    from rwkvclip_dist.data.shards.builder import BuildOptions, build_shards
    torch.set_num_threads(1)
    work = args.workdir or tempfile.mkdtemp(prefix="bench-input-")
    os.makedirs(work, exist_ok=True)
    # one tar per worker (webdataset splits by tar); the MDS shards are built from the same samples
    sides = tuple(args.image_sides) if args.image_sides else (args.image_side, args.image_side)
    if not 1 <= sides[0] <= sides[1]:
        raise ValueError("--image-sides: need 1 <= MIN <= MAX")
    label = f"{sides[0]}px" if sides[0] == sides[1] else f"{sides[0]}-{sides[1]}px"
    tar_dir = os.path.join(work, f"{args.samples}x{label}_{max(1, args.workers)}tars")
    tars = [os.path.join(tar_dir, f"{i:05d}.tar") for i in range(max(1, args.workers))]
    mds = os.path.join(tar_dir, "mds")
    if not all(os.path.exists(t) for t in tars):
        os.makedirs(tar_dir, exist_ok=True)
        make_tars(tars, args.samples, sides)
    if not os.path.exists(os.path.join(mds, "index.json")):
        build_shards(BuildOptions(inputs=tars, out=mds, workers=1))
    clean_stale_shared_memory()
    shape = (args.image_size, args.batch, args.workers)
    pipelines = {"mds (ours)": lambda: ours(mds, *shape),
                 "mds (ours), full decode": lambda: ours(mds, *shape, full_decode=True),
                 "stock StreamingDataset, same decode": lambda: stock_streaming(mds, *shape),
                 "webdataset": lambda: webdataset_loader(tars, *shape)}
    downloads: dict[str, list[int]] = {}
    with contextlib.ExitStack() as stack:
        s3 = None
        if args.object_store:
            remote_rows, s3 = object_store_pipelines(args, tars, work, shape, stack)
            pipelines.update(remote_rows)
        results: dict[str, list[tuple[int, float, float, float]]] = {k: [] for k in pipelines}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
            for name, make in pipelines.items():
                before = s3.gets() if s3 else None
                results[name].append(timed(make()))
                clean_stale_shared_memory()
                if s3 and "S3" in name:
                    downloads.setdefault(name, []).append(
                        sum(n for key, n in (s3.gets() - before).items() if "/shard." in key))
    print(f"{args.samples} samples, JPEG {label} -> {args.image_size}px, batch {args.batch}, "
          f"{args.workers} DataLoader workers, 1 torch thread per process, median of {args.repeats}")
    print("| pipeline | samples/s (wall) | samples per CPU-second, whole process (per core) "
          "| samples per CPU-second, main thread | per core vs webdataset |")
    print("|---|---|---|---|---|")
    per_core = {name: statistics.median(n / c for n, _, c, _ in runs) for name, runs in results.items()}
    for name, runs in results.items():
        wall = statistics.median(n / w for n, w, _, _ in runs)
        main_cpu = statistics.median(n / m for n, _, _, m in runs)
        print(f"| {name} | {wall:.0f} | {per_core[name]:.0f} | {main_cpu:.0f} "
              f"| {per_core[name] / per_core['webdataset']:.2f}x |")
    for name, counts in downloads.items():
        print(f"shard downloads per epoch, {name}: {statistics.median(counts):.0f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
