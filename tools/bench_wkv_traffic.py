"""Global-memory bytes and occupancy of the Bi-WKV CUDA kernels, without a GPU.

    python tools/bench_wkv_traffic.py                       # writes benchmarks/bi_wkv_traffic.md
    python tools/bench_wkv_traffic.py --out /tmp/traffic.md --no-occupancy

Both kernel versions are counted side by side: v2 (the default: one block per (batch, head), outputs
written once in the input dtype, no stored states) and v1 (RWKVCLIP_BI_WKV_KERNEL=v1: one block per
direction, fp32 atomics onto zero-filled buffers, cast passes, per-chunk states).

Traffic: the kernel source runs in the CPU emulation (csrc/testing/cpu_emulation.cpp) with its
byte counter on, which counts every global load and store the source issues (chunk loads, atomics,
stored states, bonus reads, WMMA tiles read from global memory) and the host's torch passes
(zero-fills, casts), per pass and tensor, in two ways: every byte requested, and every byte
touched for the first time in its pass. The second is what DRAM moves if the caches serve every
repeat inside a pass (the two direction blocks of a head, neighbours in launch order, read the
same inputs and add onto the same outputs; the bonus u is re-read from L1) and what the ratio is
taken on; the first is the bound with no cache at all. Passes do not share: what one kernel
stores and the next reads (the stored states) counts in both. The minimal bytes: every input read
once and every output written once, in the input dtype (bf16 here, the training precision). One
(batch, head) is run per shape: every block's traffic is the same, so bytes per element hold for
any B and H (MB columns: B=32).

Occupancy: registers, spills and shared memory of each sweep kernel for sm_90, from the ptxas
report of an sm_90 build (rwkvclip_dist.ops.build; needs nvcc, a minute or more), and the blocks
per SM they allow (65536 registers, 228 KiB of shared memory with 1 KiB reserved per block, 2048
threads).

The last line of the table, for v2 (the line above it: the same for v1): traffic_ratio=<worst
counted (first touch per pass)/minimal over the shapes> blocks_per_sm_n64=<fewest over the N=64
kernels> spill_bytes=<most spill stores + loads of one kernel at N 64/80>.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.model.registry import get_model_config
from rwkvclip_dist.ops.build import REPO_ROOT, BuildConfig, build, build_cpu_emulation
from rwkvclip_dist.ops.ptxas_report import KernelResources, ptxas_report

SHAPES = (("B/16 224 px", "RWKV-CLIP-B-16", 224), ("L/14 224 px", "RWKV-CLIP-L-14", 224),
          ("B/16 448 px", "RWKV-CLIP-B-16", 448))
BATCH = 32  # for the MB columns only
THREADS = 256  # kThreads of csrc/bi_wkv/sweep_params.h
SM90 = {"registers": 65536, "smem": 228 * 1024, "smem_reserved": 1024, "threads": 2048, "blocks": 32}


@dataclass(frozen=True)
class Shape:
    label: str
    tokens: int
    heads: int
    head_size: int


def image_shape(label: str, model: str, image_size: int) -> Shape:
    image = get_model_config(model).image
    tokens = (image_size // image.patch_size) ** 2 + (1 if image.pool == "token" else 0)
    return Shape(label, tokens, image.width // image.head_size, image.head_size)


VERSIONS = ("v1", "v2")  # the kernel versions (RWKVCLIP_BI_WKV_KERNEL); the last is the default


def count_traffic(kernels, shape: Shape, dtype: torch.dtype, version: str = "v2",
                  seed: int = 0) -> dict[tuple[str, str], tuple[int, ...]]:
    """{(pass, tensor): (bytes loaded, stored, loaded first in the pass, stored first)} of one forward
    + backward of one kernel version for one (batch, head)."""
    g = torch.Generator().manual_seed(seed)
    size = (1, shape.tokens, 1, shape.head_size)
    r, k, v, dy = (torch.randn(size, generator=g).to(dtype) for _ in range(4))
    w = (torch.rand(size, generator=g) * 9 - 6).to(dtype)
    u = torch.randn(1, shape.head_size, generator=g)
    suffix = "_v2" if version == "v2" else ""
    kernels.take_traffic()
    previous = kernels.set_traffic_counting(True)
    try:
        getattr(kernels, "forward" + suffix)(r, k, v, w, u)
        getattr(kernels, "backward" + suffix)(dy, r, k, v, w, u)
    finally:
        kernels.set_traffic_counting(previous)
    return {(p, t): tuple(bytes_) for p, t, *bytes_ in kernels.take_traffic()}


def minimal_bytes(shape: Shape, dtype: torch.dtype) -> dict[str, int]:
    """Inputs read once, outputs written once in the input dtype, for one (batch, head)."""
    elements = shape.tokens * shape.head_size
    size = torch.tensor([], dtype=dtype).element_size()
    bonus = 4 * shape.head_size  # u (fp32), and du
    return {"forward": 5 * elements * size + bonus, "backward": 9 * elements * size + 2 * bonus}


def blocks_per_sm(registers: int, smem_bytes: int) -> int:
    """Resident blocks of THREADS threads on one sm_90 SM (registers are allocated per warp in
    units of 256, i.e. rounded up to a multiple of 8 per thread)."""
    warps = THREADS // 32
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = SM90["registers"] // (per_warp * warps)
    by_smem = SM90["smem"] // (smem_bytes + SM90["smem_reserved"])
    return min(by_registers, by_smem, SM90["threads"] // THREADS, SM90["blocks"])


def head_size_of(row: KernelResources) -> int:
    return int(row.kernel.split("N=")[1].split(",")[0])


def traffic_table(kernels, shapes: list[Shape], dtype: torch.dtype) -> tuple[list[str], dict[str, float]]:
    """The Markdown tables and the worst ratio (first touch per pass over minimal) per version."""
    lines = ["## Global-memory traffic, counted in the CPU emulation", "",
             f"Bytes per element (one token, head and channel) of one forward + backward, {dtype} inputs; "
             f"MB for B={BATCH}. Per tensor and pass: requested loads / stores, and the bytes touched first "
             f"in the pass (the DRAM model).", ""]
    worst = dict.fromkeys(VERSIONS, 0.0)
    for shape in shapes:
        elements = shape.tokens * shape.head_size
        scale = BATCH * shape.heads  # (batch, head) pairs at B=32
        minimal = minimal_bytes(shape, dtype)
        least = sum(minimal.values())
        summary = [f"#### {shape.label}: both versions", "",
                   "| version | first touch per pass | counted B/elem | minimal B/elem | counted MB | minimal MB | ratio |",
                   "|---|---|---:|---:|---:|---:|---:|"]
        for version in VERSIONS:
            counts = count_traffic(kernels, shape, dtype, version)
            lines += [f"### {shape.label}, {version}: T={shape.tokens}, H={shape.heads}, N={shape.head_size}", "",
                      "| pass | tensor | requested load / store B/elem | first touch load / store B/elem |",
                      "|---|---|---:|---:|"]
            for (pass_, tensor), (loaded, stored, first_loaded, first_stored) in sorted(counts.items()):
                lines.append(f"| {pass_} | {tensor} | {loaded / elements:.2f} / {stored / elements:.2f} | "
                             f"{first_loaded / elements:.2f} / {first_stored / elements:.2f} |")
            lines.append("")
            counted = {d: sum(c[2] + c[3] for (p, _), c in counts.items() if p.startswith(d))
                       for d in ("forward", "backward")}
            requested = sum(c[0] + c[1] for c in counts.values())
            total = sum(counted.values())
            if total < least:
                raise SystemExit(f"bench_wkv_traffic: {shape.label} {version}: counted {total} bytes, "
                                 f"under the minimum {least}")
            ratio = total / least
            worst[version] = max(worst[version], ratio)
            for d in ("forward", "backward"):
                summary.append(f"| {version} | {d} | {counted[d] / elements:.1f} | {minimal[d] / elements:.1f} | "
                               f"{counted[d] * scale / 1e6:.0f} | {minimal[d] * scale / 1e6:.0f} | "
                               f"{counted[d] / minimal[d]:.2f} |")
            summary += [f"| {version} | **both** | {total / elements:.1f} | {least / elements:.1f} | "
                        f"{total * scale / 1e6:.0f} | {least * scale / 1e6:.0f} | **{ratio:.2f}** |",
                        f"| {version} | requested (no cache) | {requested / elements:.1f} | {least / elements:.1f} | "
                        f"{requested * scale / 1e6:.0f} | {least * scale / 1e6:.0f} | {requested / least:.2f} |"]
        lines += summary + [""]
    return lines, worst


def kernel_version_of(row: KernelResources) -> str:
    return "v2" if row.kernel.startswith("v2<") else "v1"


def occupancy_table(rows: list[KernelResources], smem: dict[int, int]) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """The table and, per version, (fewest blocks per SM over its N=64 kernels, most spilled bytes
    of one kernel at N 64/80)."""
    lines = ["## Occupancy on sm_90 (ptxas report of an sm_90 build)", "",
             f"{THREADS} threads per block; blocks per SM = the fewest allowed by registers, shared memory and threads. "
             "v1: one kernel per (N, sweep) for every dtype; v2: one per (N, pass, dtype), no fp32 backward "
             "(fp32 inputs take v1's).",
             "", "| kernel | registers | spill stores / loads (B) | stack (B) | shared memory (B) | blocks per SM |",
             "|---|---:|---:|---:|---:|---:|"]
    blocks_n64: dict[str, list[int]] = {v: [] for v in VERSIONS}
    spill = dict.fromkeys(VERSIONS, 0)
    for row in sorted((r for r in rows if r.arch == "sm_90"), key=lambda r: (kernel_version_of(r), head_size_of(r), r.kernel)):
        n, version = head_size_of(row), kernel_version_of(row)
        total_smem = smem[n] + row.static_smem
        blocks = blocks_per_sm(row.registers, total_smem)
        if n == 64:
            blocks_n64[version].append(blocks)
        if n in (64, 80):
            spill[version] = max(spill[version], row.spill_stores + row.spill_loads)
        lines.append(f"| {row.kernel} | {row.registers} | {row.spill_stores} / {row.spill_loads} | {row.stack} | "
                     f"{total_smem} | {blocks} |")
    missing = [v for v in VERSIONS if not blocks_n64[v]]
    if missing:
        raise SystemExit(f"bench_wkv_traffic: the ptxas report has no sm_90 kernel for N=64 of {', '.join(missing)}")
    return lines + [""], {v: (min(blocks_n64[v]), spill[v]) for v in VERSIONS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_wkv_traffic.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "bi_wkv_traffic.md")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-occupancy", action="store_true", help="skip the sm_90 build (traffic only)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs of the sm_90 build")
    return parser


def run(args: argparse.Namespace) -> int:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    start = time.perf_counter()
    shapes = [image_shape(*s) for s in SHAPES]
    lines = ["# Bi-WKV kernels: global-memory traffic and occupancy without a GPU", "",
             "Written by `python tools/bench_wkv_traffic.py` (the method is in its docstring). Counted, not "
             "timed: no GPU has run these kernels yet.", ""]
    traffic, worst = traffic_table(build_cpu_emulation(), shapes, dtype)
    lines += traffic
    summary = {v: f"traffic_ratio={worst[v]:.2f}" for v in VERSIONS}
    if not args.no_occupancy:
        module, build_dir = build(BuildConfig(archs=("9.0",), ptxas_verbose=True, jobs=args.jobs))
        rows = ptxas_report((build_dir / "build.log").read_text(errors="replace"))
        occupancy, figures = occupancy_table(rows, {n: module.shared_memory_bytes(n) for n in module.head_sizes()})
        lines += occupancy
        for v, (blocks, spill) in figures.items():
            summary[v] += f" blocks_per_sm_n64={blocks} spill_bytes={spill}"
    lines += [f"{v} (RWKVCLIP_BI_WKV_KERNEL={v}): {summary[v]}" for v in VERSIONS[:-1]]
    lines.append(summary[VERSIONS[-1]])  # the default version's figures, last
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"({time.perf_counter() - start:.0f} s; written to {args.out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
