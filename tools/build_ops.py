"""Build the Bi-WKV CUDA extension ahead of time, e.g. on a login node, for GPU nodes to import.

    python tools/build_ops.py                           # sm_80 + sm_90 into the cache directory
    python tools/build_ops.py --out /shared/rwkvclip_ext --archs 8.0 9.0 --report

Then run jobs with RWKVCLIP_EXTENSIONS_DIR=<out>: ``rwkvclip_dist.ops.bi_wkv_cuda`` finds the
library by the hash of its sources, flags and torch version, and imports it without ninja or a CUDA
toolkit on the node. Changing a source, a flag or torch makes it build afresh (JIT) instead of
loading a stale library. Needs nvcc (CUDA_HOME or PATH), ninja and the CUDA build of torch; no GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.ops.build import DEFAULT_ARCHS, BuildConfig, build, extensions_dir
from rwkvclip_dist.ops.ptxas_report import format_report, ptxas_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="build_ops.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help=f"cache directory (default: {extensions_dir()})")
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    parser.add_argument("--report", action="store_true", help="print registers, shared memory and spills")
    return parser


def run(args: argparse.Namespace) -> int:
    config = BuildConfig(archs=tuple(args.archs), ptxas_verbose=args.report, jobs=args.jobs)
    start = time.perf_counter()
    module, build_dir = build(config, root=args.out)
    print(f"built {build_dir.name} for sm_{', sm_'.join(a.replace('.', '') for a in config.archs)} "
          f"in {time.perf_counter() - start:.0f} s: {build_dir}")
    if args.report:
        rows = ptxas_report((build_dir / "build.log").read_text(errors="replace"))
        print(format_report(rows, {n: module.shared_memory_bytes(n) for n in module.head_sizes()}))
    print(f"use it with: export RWKVCLIP_EXTENSIONS_DIR={build_dir.parent}")


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
