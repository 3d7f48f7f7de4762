"""CPU benchmark of Bi-WKV forward+backward: the exact chunked path against the naive per-token scan.

    python tools/bench_wkv_cpu.py [--batch 2 --heads 8 --head-size 80 --repeats 3] [--out benchmarks/bi_wkv_cpu.md]

Prints one table (median seconds per forward+backward call and the speed-up over the scan, measured in
the same run) and optionally writes it as Markdown.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked
from rwkvclip_dist.ops.bi_wkv_reference import bi_wkv_scan


def time_fwd_bwd(fn, inputs, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up allocators and is dropped
        leaves = [x.detach().requires_grad_() for x in inputs]
        start = time.perf_counter()
        fn(*leaves).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_wkv_cpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=80)
    parser.add_argument("--tokens", type=int, nargs="+", default=[49, 196, 577, 1025])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the table as Markdown to this file")
    return parser


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    rows = []
    for tokens in args.tokens:
        shape = (args.batch, tokens, args.heads, args.head_size)
        inputs = [torch.randn(shape) for _ in range(3)] + [torch.rand(shape) * 6 - 5, torch.randn(args.heads, args.head_size)]
        scan = time_fwd_bwd(bi_wkv_scan, inputs, args.repeats)
        chunked = time_fwd_bwd(bi_wkv_chunked, inputs, args.repeats)
        rows.append((tokens, scan, chunked, scan / chunked))

    header = f"Bi-WKV fwd+bwd on CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), " \
             f"B={args.batch} H={args.heads} N={args.head_size}, fp32, median of {args.repeats}"
    lines = [header, "", "| T | naive scan (s) | chunked (s) | speed-up |", "|---:|---:|---:|---:|"]
    lines += [f"| {t} | {s:.4f} | {c:.4f} | {x:.1f}x |" for t, s, c, x in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(f"# Bi-WKV CPU benchmark\n\nCommand: `python tools/bench_wkv_cpu.py --out {args.out}`\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
