"""Compile the Triton Bi-WKV kernels for an NVIDIA GPU without one, and print what ptxas says.

    python tools/triton_kernel_report.py                         # sm_90 and sm_80, bf16 and fp32, N 64/80/128
    python tools/triton_kernel_report.py --archs 90 --head-sizes 64 --dtypes bf16

Triton's interpreter (tests/test_ops_triton.py) checks what the kernels compute, not that they
compile: this lowers them through Triton's own compiler to PTX for the architecture and assembles
that with the ptxas bundled in the triton wheel, as a GPU's first call would, then reports
registers, shared memory, stack and spills per kernel (rwkvclip_dist/ops/ptxas_report.py's table).
Needs no GPU and no CUDA toolkit. Must not run with TRITON_INTERPRET=1 set.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.ops.ptxas_report import KernelResources, ptxas_report

POINTERS = {"forward_kernel": ("r", "k", "v", "w", "out"),
            "backward_kernel": ("r", "k", "v", "w", "grad", "states", "d_r", "d_k", "d_v", "d_ld")}
INPUTS = ("r", "k", "v", "w", "grad")


def compile_kernels(dtype: str, head_size: int, arch: int, num_warps: int = 4) -> list[KernelResources]:
    """Both kernels for inputs of `dtype` ('bf16', 'fp16', 'fp32') and head size N on sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rwkvclip_dist.ops import bi_wkv_triton, bi_wkv_triton_kernels as kernels

    if bi_wkv_triton.interpreted():
        raise SystemExit("triton_kernel_report: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    block, blocks = bi_wkv_triton._blocks(head_size)
    constants = {"H": 4, "N": head_size, "BT": bi_wkv_triton.CHUNK, "BK": block, "BV": block, "NB": blocks,
                 "PRECISION": "tf32x3"}
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    rows = []
    for name, pointers in POINTERS.items():
        fn = getattr(kernels, name)
        signature = {arg: (f"*{dtype}" if arg in INPUTS else "*fp32") if arg in pointers else
                     "i32" if arg in ("B", "T") else "constexpr" for arg in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps})
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / f"{name}.ptx"
            ptx.write_text(compiled.asm["ptx"])
            target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # Triton emits sm_90a PTX for Hopper
            run = subprocess.run([str(ptxas), "-v", f"-arch={target}", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
                                 capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"ptxas failed on {name} (sm_{arch}, {dtype}, N={head_size}): {run.stderr.strip()}")
        for row in ptxas_report((run.stdout + run.stderr).replace(f"'{target}'", f"'sm_{arch}'")):
            rows.append(KernelResources(f"{name.removesuffix('_kernel')} {dtype} N={head_size}", row.arch,
                                        row.registers, max(row.static_smem, compiled.metadata.shared), row.stack,
                                        row.spill_stores, row.spill_loads))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triton_kernel_report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--head-sizes", type=int, nargs="+", default=[64, 80, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--num-warps", type=int, default=4)
    return parser


def run(args: argparse.Namespace) -> int:
    print(f"{'kernel':24} {'arch':6} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}")
    for arch in args.archs:
        for dtype in args.dtypes:
            for size in args.head_sizes:
                for row in compile_kernels(dtype, size, arch, args.num_warps):
                    print(f"{row.kernel:24} {row.arch:6} {row.registers:>4} {row.static_smem:>6} {row.stack:>5} "
                          f"{row.spill_stores:>5}/{row.spill_loads:<5}", flush=True)
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
