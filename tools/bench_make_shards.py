#!/usr/bin/env python
"""Shard-builder benchmarks: peak memory of the caption join, and an N-part build against one part.

    python tools/bench_make_shards.py captions --rows 100000 1000000 10000000
    python tools/bench_make_shards.py parts --tars 16 --samples-per-tar 512 --image-side 512 --parts 4

``captions``: one build of a small tar with a caption file of R rows, per R, each in a fresh process,
once with the on-disk caption table (``rwkvclip_dist.data.shards.captions``) and once with the in-memory dict
join the builder used before (kept below as the baseline); reports the process's peak RSS (its
high-water mark, ``ru_maxrss``) and the time. ``parts``: the same inputs built as one part and as N
parts plus the merge, each part in its own process (as on a cluster), timed one after another; the
cluster's wall time is estimated as prepare + the slowest part + merge. Results: benchmarks/make_shards.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

from rwkvclip_dist.cli import run_tool

TOOLS = os.path.dirname(os.path.abspath(__file__))
INPUT_SAMPLES = 512  # the tar of the captions benchmark: caption rows, not images, are what grows


class MemoryCaptions:
    """The join before the on-disk table: every caption file merged into one dict (later files win)."""

    def __init__(self, paths: list[str]) -> None:
        self.table: dict[str, dict] = {}
        for path in paths:
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        obj = json.loads(line)
                        self.table.setdefault(obj["key"], {}).update(
                            {k: v for k, v in obj.items() if k in ("synthetic", "generated", "tags")})

    def get(self, key: str) -> dict | None:
        return self.table.get(key)

    def __len__(self) -> int:
        return len(self.table)

    def unknown(self, hit_files: list[str], scratch: str, sample: int = 20) -> tuple[int, list[str]]:
        hits: set[str] = set()
        for path in hit_files:
            with open(path) as f:
                hits.update(json.loads(line) for line in f)
        missing = sorted(set(self.table) - hits)
        return len(missing), missing[:sample]


def _jpeg(rng, side: int) -> bytes:
    from PIL import Image
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    a, b = rng.random(2)
    pixels = np.stack([a * xx + (1 - a) * yy, b * yy, 1 - xx], -1) * 255
    pixels = (pixels + rng.normal(0, 8, pixels.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: str, keys: list[str], side: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, data in (("jpg", _jpeg(rng, side)), ("txt", f"raw text of {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_captions(path: str, rows: int) -> None:
    """``rows`` caption lines in a shuffled key order (as files from several jobs concatenated)."""
    order = np.random.default_rng(rows).permutation(rows)
    with open(path, "w") as f:
        for start in range(0, rows, 100_000):
            f.write("".join(f'{{"key": "k{i:09d}", "synthetic": "a photo of item {i} on a wooden table", '
                            f'"tags": ["item", "table"]}}\n' for i in order[start:start + 100_000]))


def child(args: argparse.Namespace) -> int:
    """One build in this process; prints peak RSS and times as JSON."""
    from rwkvclip_dist.data.shards.builder import BuildOptions, build_shards
    from rwkvclip_dist.data.shards.captions import index_captions, index_path
    opts = BuildOptions(inputs=[args.input], out=args.out, captions=[args.captions], workers=1)
    with open("/proc/self/status") as f:  # resident after the imports (torch, via Streaming, is ~1 GB)
        imported = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    start = time.perf_counter()
    if args.store == "memory":
        captions = MemoryCaptions(opts.captions)
    else:
        captions = None
        index_captions(opts.captions, index_path(os.path.join(args.out, ".build"), opts.captions))
    loaded = time.perf_counter()
    report = build_shards(opts, captions=captions)
    done = time.perf_counter()
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "imported_rss_mib": imported,
                      "load_s": loaded - start, "build_s": done - loaded, "written": report["written"],
                      "unknown": report["unknown_caption_keys"]}, allow_nan=False))
    return 0


def _cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str]) -> tuple[str, float, float]:
    """(stdout, wall s, CPU s of the process and its workers)."""
    start, cpu = time.perf_counter(), _cpu_of_children()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - start, _cpu_of_children() - cpu


def captions_bench(args: argparse.Namespace, work: str) -> None:
    tar = os.path.join(work, "input.tar")
    if not os.path.exists(tar):
        # Half the samples have captions; the other half are keys no caption file has.
        write_tar(tar, [f"k{i:09d}" for i in range(0, 2 * INPUT_SAMPLES, 2)], 64, 0)
    print(f"build of one tar ({INPUT_SAMPLES} samples, 64 px) with R caption rows; peak RSS of the "
          f"whole build process (ru_maxrss) and its growth over the process after its imports; one "
          f"process per cell, 1 worker")
    print("| caption rows | on-disk table: peak RSS MiB | on-disk: growth MiB | on-disk: index s "
          "| on-disk: build s | in-memory dict: peak RSS MiB | in-memory: growth MiB | in-memory: load s "
          "| in-memory: build s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        caps = os.path.join(work, f"captions-{rows}.jsonl")
        if not os.path.exists(caps):
            write_captions(caps, rows)
        cells = []
        for store in ("disk", "memory"):
            if store == "memory" and rows > args.baseline_max_rows:
                cells.append(None)
                continue
            out = os.path.join(work, f"out-{store}-{rows}")
            subprocess.run(["rm", "-rf", out], check=True)
            stdout, _, _ = _run([sys.executable, __file__, "_child", "--store", store, "--input", tar,
                              "--captions", caps, "--out", out])
            cells.append(json.loads(stdout.strip().splitlines()[-1]))
            subprocess.run(["rm", "-rf", out], check=True)
        disk, mem = cells
        def cols(c: dict | None) -> str:
            if c is None:
                return "| - | - | - | - "
            return (f"| {c['peak_rss_mib']:.0f} | {c['peak_rss_mib'] - c['imported_rss_mib']:.0f} "
                    f"| {c['load_s']:.1f} | {c['build_s']:.1f} ")
        print(f"| {rows:,} {cols(disk)}{cols(mem)}|", flush=True)


def parts_bench(args: argparse.Namespace, work: str) -> None:
    tars = [os.path.join(work, f"{t:05d}.tar") for t in range(args.tars)]
    for t, path in enumerate(tars):
        if not os.path.exists(path):
            write_tar(path, [f"t{t}-{i:05d}" for i in range(args.samples_per_tar)], args.image_side, t)
    caps = os.path.join(work, "captions.jsonl")
    with open(caps, "w") as f:
        f.write("".join(json.dumps({"key": f"t{t}-{i:05d}", "synthetic": f"caption {t} {i}"}, allow_nan=False) + "\n"
                        for t in range(args.tars) for i in range(0, args.samples_per_tar, 2)))
    tool = [sys.executable, os.path.join(TOOLS, "make_shards.py")]
    common = ["--captions", caps, "--workers", "1"] + [a for t in tars for a in ("--input", t)]
    one, many = os.path.join(work, "one"), os.path.join(work, "many")
    subprocess.run(["rm", "-rf", one, many], check=True)
    steps = [("one part", tool + common + ["--out", one]),
             ("prepare (checks inputs, indexes captions)", tool + common + ["--out", many, "--prepare"])]
    steps += [(f"part {i}/{args.parts}", tool + common + ["--out", many, "--shard", f"{i}/{args.parts}"])
              for i in range(args.parts)]
    steps += [("merge", tool + ["--out", many, "--merge", "--workers", "1"]),
              ("process start-up alone (make_shards.py --help)", tool + ["--out", many, "--help"])]
    times = {name: _run(cmd)[1:] for name, cmd in steps}
    with open(os.path.join(one, "build_report.json")) as f1, open(os.path.join(many, "build_report.json")) as f2:
        same = json.load(f1) == json.load(f2)
    print(f"{args.tars * args.samples_per_tar} samples in {args.tars} tars ({args.image_side} px JPEGs, half "
          f"captioned), 1 worker per process, one process per step, run one after another; reports "
          f"identical: {same}")
    print("| step | wall s | CPU s |")
    print("|---|---|---|")
    for name, (wall, cpu) in times.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    parts = [times[f"part {i}/{args.parts}"] for i in range(args.parts)]
    fixed = [times["prepare (checks inputs, indexes captions)"], times["merge"]]
    path = [fixed[0][k] + max(p[k] for p in parts) + fixed[1][k] for k in (0, 1)]
    work = [fixed[0][k] + sum(p[k] for p in parts) + fixed[1][k] for k in (0, 1)]
    one = times["one part"]
    print(f"| {args.parts} parts on {args.parts} nodes: prepare + slowest part + merge | {path[0]:.1f} | {path[1]:.1f} |")
    print(f"| speed-up of that over one part | {one[0] / path[0]:.2f}x | {one[1] / path[1]:.2f}x |")
    print(f"| all steps of the {args.parts}-part build together (the work) | {work[0]:.1f} | {work[1]:.1f} |")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_make_shards.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("captions", help="peak memory of the caption join against caption rows")
    c.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    c.add_argument("--baseline-max-rows", type=int, default=10_000_000,
                   help="skip the in-memory baseline above this many rows (it needs ~0.5 KB a row)")
    n = sub.add_parser("parts", help="an N-part build plus merge against a one-part build")
    n.add_argument("--tars", type=int, default=8)
    n.add_argument("--samples-per-tar", type=int, default=256)
    n.add_argument("--image-side", type=int, default=256)
    n.add_argument("--parts", type=int, default=4)
    for q in (c, n):
        q.add_argument("--workdir", default=None)
    k = sub.add_parser("_child")
    for name in ("--store", "--input", "--captions", "--out"):
        k.add_argument(name, required=True)
    return p


def run(args: argparse.Namespace) -> int:
    if args.cmd == "_child":
        return child(args)
    work = args.workdir or tempfile.mkdtemp(prefix="bench-shards-")
    os.makedirs(work, exist_ok=True)
    (captions_bench if args.cmd == "captions" else parts_bench)(args, work)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
