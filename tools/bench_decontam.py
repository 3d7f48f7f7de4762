#!/usr/bin/env python
"""Cost of decontamination per training image, and the size of the evaluation-hash index.

    python tools/bench_decontam.py --eval-images 730000 --queries 2000

Builds an index (rwkvclip_dist/data/shards/decontam.py) of ``--eval-images`` x VARIANTS hashes (random
64-bit values stand in for the hashes of DataComp's ~730,000 evaluation images: the index's size
and search work depend on the count, and uniform bands are the best case for it; real hashes
cluster somewhat, so read the query time as a lower bound), then measures per training image:
hashing a JPEG (decode + perceptual hash) at two sizes, the index search, and as the baseline in
the same run a brute-force scan over every evaluation hash. With ``--recall-images N`` it also
measures what the thresholds catch: N photo-like pictures are hashed as evaluation images, four
kinds of copies of each are hashed as training images (resized; JPEG quality 60; 0-5% cropped off
each side; all three with a squash), and N other pictures stand for distinct training images.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.data.shards.decontam import VARIANTS, HashIndex, eval_hashes, phash_bytes, write_index


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _photo(size: int, seed: int) -> Image.Image:
    """Smooth colour waves and a few bright or dark patches: a photo's low-frequency structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = sum(np.sin(2 * np.pi * (rng.uniform(0.5, 6) * x + rng.uniform(0.5, 6) * y))[..., None] * rng.uniform(-1, 1, 3)
              for _ in range(6))
    for _ in range(3):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        img[y0 : y0 + size // 4, x0 : x0 + size // 5] += rng.uniform(-1.5, 1.5, 3)
    return Image.fromarray(((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8))


def _encode(image: Image.Image, quality: int = 90, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, quality=quality)
    return out.getvalue()


def _jpeg(size: int, seed: int) -> bytes:
    return _encode(_photo(size, seed))


def _copy(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    w, h = image.size
    if kind in ("cropped", "all three"):
        left, top, right, bottom = (rng.uniform(0, 0.05, 4) * [w, h, w, h]).astype(int)
        image = image.crop((left, top, w - right, h - bottom))
    if kind in ("resized", "all three"):
        image = image.resize((int(image.width * rng.uniform(0.4, 0.8)), int(image.height * rng.uniform(0.4, 0.8))))
    return _encode(image, 60 if kind in ("re-encoded", "all three") else 95)


def recall_table(n: int, max_distance: int) -> list[tuple[str, str]]:
    """What ``max_distance`` catches among copies of ``n`` evaluation pictures, and how many of
    ``n`` distinct pictures it wrongly matches (brute force over the pictures' hashes)."""
    rng = np.random.default_rng(1)
    index = np.array([eval_hashes(_encode(_photo(256, 10_000 + i), fmt="PNG")) for i in range(n)], dtype=np.uint64)
    rows = []
    for kind in ("resized", "re-encoded", "cropped", "all three"):
        dist = [int(np.bitwise_count(index[i] ^ np.uint64(phash_bytes(_copy(_photo(256, 10_000 + i), kind, rng)))).min())
                for i in range(n)]
        caught = sum(d <= max_distance for d in dist)
        rows.append((f"copies {kind}: caught", f"{caught} of {n} ({100 * caught / n:.1f}%), worst distance {max(dist)}"))
    distinct = [int(np.bitwise_count(index ^ np.uint64(phash_bytes(_jpeg(256, 90_000 + i)))).min()) for i in range(n)]
    wrong = sum(d <= max_distance for d in distinct)
    rows.append(("distinct pictures matched (false positives)", f"{wrong} of {n}, nearest distance {min(distinct)}"))
    return rows


def _per_call_us(fn, args: list, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for a in args:
            fn(a)
    return (time.perf_counter() - start) / (repeat * len(args)) * 1e6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_decontam.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-images", type=int, default=730_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--brute-queries", type=int, default=20)
    p.add_argument("--workdir", default=None, help="where the index is written (default: a temp dir)")
    p.add_argument("--recall-images", type=int, default=0, help="also measure what the threshold catches")
    p.add_argument("--max-distance", type=int, default=6)
    return p


def run(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        n_hashes = args.eval_images * VARIANTS
        hashes = rng.integers(0, 2**63, n_hashes, dtype=np.int64).view(np.uint64) ^ (
            rng.integers(0, 2, n_hashes, dtype=np.uint64) << np.uint64(63))
        start = time.perf_counter()
        write_index(Path(tmp) / "idx", ["t"], [(0, f"s{i:07d}") for i in range(args.eval_images)],
                    hashes.reshape(-1, VARIANTS), [], 0)
        build_s = time.perf_counter() - start
        del hashes
        disk_mb = sum(f.stat().st_size for f in (Path(tmp) / "idx").iterdir()) / 2**20
        rss0 = _rss_mb()
        index = HashIndex(Path(tmp) / "idx")
        queries = [int(q) for q in rng.integers(0, 2**63, args.queries, dtype=np.int64)]
        # Half the queries are planted neighbours of indexed hashes (max-distance bits flipped): all must be found.
        planted = [int(index.hashes[r]) ^ sum(1 << int(b) for b in rng.choice(64, args.max_distance, replace=False))
                   for r in rng.integers(0, n_hashes, args.queries // 2)]
        found = sum(index.nearest(q, args.max_distance) is not None for q in planted)
        query_us = _per_call_us(lambda q: index.nearest(q, args.max_distance), queries + planted)
        rss_mb = _rss_mb() - rss0
        all_hashes = np.asarray(index.hashes)

        def brute(q: int) -> int:
            return int(np.bitwise_count(all_hashes ^ np.uint64(q)).min())

        brute_us = _per_call_us(brute, queries[: args.brute_queries])
    jpegs = {size: [_jpeg(size, s) for s in range(20)] for size in (256, 512)}
    hash_us = {size: _per_call_us(phash_bytes, data, repeat=3) for size, data in jpegs.items()}
    eval_us = _per_call_us(eval_hashes, [_encode(_photo(256, s), fmt="PNG") for s in range(10)])
    per_image_us = hash_us[256] + query_us
    rows = [("evaluation images x hashes each", f"{args.eval_images:,} x {VARIANTS} = {n_hashes:,}"),
            ("index build (s)", f"{build_s:.1f}"),
            ("index on disk (MiB)", f"{disk_mb:.0f}"),
            ("resident memory after the queries (MiB, mmap pages touched)", f"{rss_mb:.0f}"),
            (f"planted {args.max_distance}-bit neighbours found", f"{found} of {len(planted)}"),
            ("hash one 256 px JPEG (us)", f"{hash_us[256]:.0f}"),
            ("hash one 512 px JPEG (us)", f"{hash_us[512]:.0f}"),
            (f"hash one 256 px evaluation image, {VARIANTS} variants (us)", f"{eval_us:.0f}"),
            (f"index search, max distance {args.max_distance} (us)", f"{query_us:.0f}"),
            ("baseline: brute-force scan of every hash (us)", f"{brute_us:.0f}"),
            ("search speed-up over the scan", f"{brute_us / query_us:.0f}x"),
            ("1e9 training images at 256 px, one core (core-hours)", f"{per_image_us * 1e9 / 3.6e9:.0f}"),
            ("same with the brute-force scan (core-hours)", f"{(hash_us[256] + brute_us) * 1e9 / 3.6e9:,.0f}")]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\npeak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.recall_images:
        print(f"\n| at max distance {args.max_distance} | result |\n|---|---|")
        for name, value in recall_table(args.recall_images, args.max_distance):
            print(f"| {name} | {value} |")
    return 0 if found == len(planted) else 1


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
