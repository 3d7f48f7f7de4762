"""What the Bi-WKV self-test (rwkvclip_dist/ops/self_test.py) costs on first use, per path and head size.

    python tools/bench_self_test.py                          # CPU: the chunked path as the "fused" one
    TRITON_INTERPRET=1 python tools/bench_self_test.py       # CPU: + the Triton kernel, interpreted
    python tools/bench_self_test.py --device cuda            # GPU: + the CUDA and Triton kernels

Prints one row per (path, dtype, N): the wall time of the whole self-test (the float64 chunked
reference on the CPU included), the part spent in the tested path, its worst relative error and
whether it passed. The chunked path stands in as the baseline: its row is the fixed cost of the
reference and the comparison.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.ops import bi_wkv_chunked, bi_wkv_cuda, bi_wkv_triton
from rwkvclip_dist.ops.self_test import run_self_test


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_self_test.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--head-sizes", type=int, nargs="+", default=[16, 64, 80])
    return parser


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    paths = [("chunked", bi_wkv_chunked)]
    if device.type == "cuda" and bi_wkv_cuda.is_available():
        paths.append(("cuda", bi_wkv_cuda.bi_wkv_cuda))
    if bi_wkv_triton.is_available(device):
        paths.append(("triton" + (" (interpreted)" if bi_wkv_triton.interpreted() else ""), bi_wkv_triton.bi_wkv_triton))
    print(f"Bi-WKV self-test cost on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    print("| path | dtype | N | self-test s | of which the path s | worst rel. error | passed |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, fn in paths:
        for dtype in (torch.float32, torch.bfloat16):
            for size in args.head_sizes:
                started = time.perf_counter()
                outcome = run_self_test(fn, name, device, dtype, size)
                total = time.perf_counter() - started
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {size} | {total:.3f} | "
                      f"{outcome['seconds']:.3f} | {outcome.get('worst_error', outcome.get('error'))} | "
                      f"{outcome['passed']} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
