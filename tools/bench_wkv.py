"""GPU benchmark of Bi-WKV forward+backward: our fused kernels against the baselines of issue 5.

    python tools/bench_wkv.py                      # writes benchmarks/bi_wkv_<gpu>.md
    python tools/bench_wkv.py --tokens 197 577 --repeats 20 --out /tmp/table.md

Rows per T (B*H fills the GPU, N=64):
  ours bf16 / ours fp32  rwkvclip::bi_wkv (csrc/bi_wkv), the v2 kernels (the default)
  ours v1 bf16 / fp32    the same op with RWKVCLIP_BI_WKV_KERNEL=v1 (one block per direction, fp32
                         atomics, stored states), timed in the same run
  triton bf16 / fp32     rwkvclip::bi_wkv_triton (rwkvclip_dist/ops/bi_wkv_triton.py), the second
                         fused path
  two-scan fp32          the reference RWKV-CLIP's algorithm: a per-token scan per thread, run
                         forwards and backwards (csrc/bench/two_scan_baseline.cu, built here)
  fla x2 bf16            flash-linear-attention's chunk_rwkv6 on the sequence and on its flipped
                         copy (bonus only in the first); skipped when `fla` is not installed
                         (pip install -e ".[bench]", or flash-linear-attention>=0.6)
  SDPA bf16              torch scaled_dot_product_attention at the same B, T, H, N (the
                         transformer baseline; a different operator, timed for scale)
Columns: median milliseconds per forward+backward, the bytes an ideal implementation must move
(inputs read, outputs written, forward and backward) over that time, the fraction of the HBM peak
this is, the speed-up of ours (same dtype) over the row, and the output's relative difference to
ours (fp32), which guards against timing something that computes a different thing.

``--device cpu`` runs the same table at whatever size is asked for on the CPU, where "ours" is the
chunked path and only SDPA is beside it (and the Triton kernel, under
TRITON_INTERPRET=1 set before the run): it checks this script, not the kernels (tools/gpu_check.sh --cpu).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkvclip_dist import ops
from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.ops import bi_wkv_cuda as ours
from rwkvclip_dist.ops import bi_wkv_triton
from rwkvclip_dist.ops.build import (BuildConfig, REPO_ROOT, extensions_dir, pinned_arch_list, use_toolkit,
                                     wheel_cuda_includes)

HEAD_SIZE = 64


def peak_bandwidth(override_gbs: float | None) -> float:
    """HBM peak in bytes/s: double data rate x memory clock x bus width, or the override."""
    if override_gbs:
        return override_gbs * 1e9
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        raise SystemExit("this torch does not report the memory clock; pass --peak-gbs (e.g. 3350 for H100 SXM)")
    return 2 * clock_khz * 1e3 * bus_bits / 8


def build_two_scan(archs: tuple[str, ...]):
    """Compile (or find compiled) csrc/bench/two_scan_baseline.cu for `archs`, e.g. ("9.0",);
    tests/test_cuda_build.py compiles it without a GPU, so a GPU run does not meet a compile error."""
    from torch.utils import cpp_extension

    use_toolkit()
    source = REPO_ROOT / "csrc" / "bench" / "two_scan_baseline.cu"
    build_dir = extensions_dir() / "rwkvclip_two_scan_baseline"
    build_dir.mkdir(parents=True, exist_ok=True)
    with pinned_arch_list(archs):
        return cpp_extension.load(
            name="rwkvclip_two_scan_baseline", sources=[str(source)], build_directory=str(build_dir),
            extra_cuda_cflags=BuildConfig(archs=archs).code_flags(),
            extra_cflags=["-O3", "-std=c++20"], extra_include_paths=wheel_cuda_includes())


def two_scan_baseline():
    major, minor = torch.cuda.get_device_capability()
    module = build_two_scan((f"{major}.{minor}",))

    class TwoScan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, r, k, v, w, u):
            ctx.save_for_backward(r, k, v, w, u)
            return module.forward(r, k, v, w, u)

        @staticmethod
        def backward(ctx, grad):
            return tuple(module.backward(grad.contiguous(), *ctx.saved_tensors))

    return TwoScan.apply


def fla_twice():
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
    except ImportError:
        return None

    def run(r, k, v, w, u):
        log_w = -torch.exp(w.float())
        u = u.to(r.dtype)
        forward = chunk_rwkv6(r, k, v, log_w, u, scale=1.0)[0]
        flip = [x.flip(1) for x in (r, k, v, log_w)]  # strictly-future part; the bonus only once
        backward = chunk_rwkv6(*flip, torch.zeros_like(u), scale=1.0)[0].flip(1)
        return forward + backward

    return run


def sdpa(r, k, v, w, u):
    del w, u  # attention has no decay and no bonus
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (r, k, v))).transpose(1, 2)


@contextlib.contextmanager
def kernel_version(name: str):
    """RWKVCLIP_BI_WKV_KERNEL for a row's forward and backward (the op reads it on every call):
    v1 for the "ours v1" rows, v2 for the others."""
    old = os.environ.get(ours.KERNEL_VARIABLE)
    os.environ[ours.KERNEL_VARIABLE] = "v1" if name == "ours v1" else "v2"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ours.KERNEL_VARIABLE)
        else:
            os.environ[ours.KERNEL_VARIABLE] = old


def time_fwd_bwd(fn, inputs, grad, repeats: int) -> tuple[float, torch.Tensor]:
    leaves = [x.detach().requires_grad_() for x in inputs]
    output = fn(*leaves)
    output.backward(grad)  # warm-up: builds, autotunes, fills the allocator
    times = []
    for _ in range(repeats):
        leaves = [x.detach().requires_grad_() for x in inputs]
        if grad.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*leaves).backward(grad)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn(*leaves).backward(grad)
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), output.detach()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_wkv.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[197, 257, 577, 1025, 4096])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-gbs", type=float, help="HBM peak in GB/s when torch cannot tell")
    parser.add_argument("--out", help="Markdown file (default benchmarks/bi_wkv_<gpu>.md)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check this script without a GPU")
    parser.add_argument("--build-baseline", metavar="ARCH",
                        help="only compile the two-scan baseline for ARCH (e.g. 9.0) and exit: needs nvcc, not a GPU "
                             "(tools/gpu_check.sh --cpu does this before a GPU session)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.build_baseline:
        module = build_two_scan((args.build_baseline,))
        assert callable(module.forward) and callable(module.backward)
        print(f"two-scan baseline compiled for sm_{args.build_baseline.replace('.', '')}")
        return
    device = torch.device(args.device)
    if device.type == "cpu":
        if not args.out:
            raise SystemExit("bench_wkv --device cpu: pass --out (CPU timings do not belong in benchmarks/)")
        gpu, peak, batch, fla = "CPU", float("nan"), 1, None
        methods = [("ours", dtype, ops.bi_wkv_chunked) for dtype in (torch.bfloat16, torch.float32)]
        if bi_wkv_triton.is_available(device):
            methods += [("triton", dtype, bi_wkv_triton.bi_wkv_triton) for dtype in (torch.bfloat16, torch.float32)]
        methods += [("SDPA", torch.bfloat16, sdpa)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_wkv needs a CUDA GPU (or --device cpu)")
        if not ours.is_available():
            raise SystemExit(f"the Bi-WKV kernel is unavailable: {ours.unavailable_reason()}")
        gpu = torch.cuda.get_device_name(0)
        peak = peak_bandwidth(args.peak_gbs)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        batch = max(1, -(-2 * sms // args.heads))  # two (batch, head) pairs per SM at least
        methods = [(name, dtype, ours.bi_wkv_cuda) for name in ("ours", "ours v1") for dtype in (torch.bfloat16, torch.float32)]
        methods += [("two-scan", torch.float32, two_scan_baseline())]
        if bi_wkv_triton.is_available(device):
            methods += [("triton", dtype, bi_wkv_triton.bi_wkv_triton) for dtype in (torch.bfloat16, torch.float32)]
        else:
            print(f"bench_wkv: no Triton row: {bi_wkv_triton.unavailable_reason(device)}")
        fla = fla_twice()
        methods += [("fla x2", torch.bfloat16, fla)] if fla else []
        methods += [("SDPA", torch.bfloat16, sdpa)]

    lines = [f"Bi-WKV forward+backward on {gpu} (HBM peak {peak / 1e9:.0f} GB/s), B={batch} H={args.heads} "
             f"N={HEAD_SIZE}, median of {args.repeats}" + ("" if fla else "; fla not installed"), "",
             "| T | method | dtype | ms / call | ideal GB/s | % of HBM peak | ours is faster by | rel. diff of y |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    torch.manual_seed(0)
    for tokens in args.tokens:
        shape = (batch, tokens, args.heads, HEAD_SIZE)
        base = [torch.randn(shape, device=device) for _ in range(3)] + [torch.rand(shape, device=device) * 6 - 5]
        bonus = torch.randn(args.heads, HEAD_SIZE, device=device)
        grad = torch.randn(shape, device=device)
        results = {}
        for name, dtype, fn in methods:
            inputs = [x.to(dtype) for x in base] + [bonus]
            with kernel_version(name):
                ms, y = time_fwd_bwd(fn, inputs, grad.to(dtype), args.repeats)
            # ideal traffic: fwd reads r, k, v, w and writes y; bwd reads those and dy, writes 4 grads
            tensors = 12 if name == "SDPA" else 14  # SDPA: q, k, v, o / q, k, v, o, do, dq, dk, dv
            ideal = tensors * torch.Size(shape).numel() * torch.finfo(dtype).bits / 8
            results[(name, dtype)] = (ms, ideal, y.float())
        reference = results[("ours", torch.float32)][2]
        for (name, dtype), (ms, ideal, y) in results.items():
            mine = results[("ours", dtype)][0]
            diff = "n/a" if name == "SDPA" else f"{((y - reference).norm() / reference.norm()).item():.1e}"
            achieved = ideal / (ms * 1e-3)  # bytes per second
            lines.append(f"| {tokens} | {name} | {str(dtype).removeprefix('torch.')} | {ms:.3f} | "
                         f"{achieved / 1e9:.0f} | {100 * achieved / peak:.0f}% | {ms / mine:.2f}x | {diff} |")
    table = "\n".join(lines)
    print(table)
    gpu_slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / f"bi_wkv_{gpu_slug}.md"
    out.write_text(f"# Bi-WKV GPU benchmark\n\nCommand: `python tools/bench_wkv.py`\n\n{table}\n")
    print(f"written to {out}")


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
