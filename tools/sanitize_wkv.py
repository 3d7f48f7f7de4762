"""A small Bi-WKV forward + backward for every compiled head size, for compute-sanitizer.

    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitize_wkv.py
    python tools/sanitize_wkv.py --device cpu          # the same calls on the chunked path (no GPU)

Small on purpose (one batch, two heads, T=37: three chunks, the last one ragged, in both directions)
so that racecheck, synccheck, initcheck and memcheck finish in seconds. Every output is checked
against the chunked path in float64 on the CPU (a sanitizer run must still compute the right thing), and the
kernel's inputs are views 4 bytes off an aligned start once, so the host's copy-to-aligned path runs
under memcheck too.
"""
from __future__ import annotations

import argparse
import sys

import torch

from rwkvclip_dist import ops
from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked

HEAD_SIZES = (16, 64, 80, 128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sanitize_wkv.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=37)
    return parser


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and set(ops.prepare(device, torch.bfloat16, HEAD_SIZES).values()) != {"cuda"}:
        raise SystemExit("sanitize_wkv: the fused kernel is not available for every head size: "
                         f"{ops.prepare(device, torch.bfloat16, HEAD_SIZES)}")
    torch.manual_seed(0)
    for size in HEAD_SIZES:
        for dtype, tol, misaligned in ((torch.float32, 1e-5, False), (torch.bfloat16, 5e-3, True)):
            shape = (1, args.tokens, 2, size)
            base = [torch.randn(shape, device=device) for _ in range(3)] + [torch.rand(shape, device=device) * 6 - 5]
            u = torch.randn(2, size, device=device)
            grad = torch.randn(shape, device=device).to(dtype)
            inputs = []
            for x in base:
                x = x.to(dtype)
                if misaligned:  # the same values 4 bytes past an aligned start
                    x = torch.empty(x.numel() + 2, dtype=dtype, device=device)[2:].view(shape).copy_(x)
                inputs.append(x.requires_grad_())
            u.requires_grad_()
            y = ops.bi_wkv(*inputs, u)
            y.backward(grad)
            # the reference on the CPU: under the sanitizer the GPU runs little besides the kernels
            leaves = [x.detach().cpu().double().requires_grad_() for x in (*inputs, u)]
            want = bi_wkv_chunked(*leaves)
            want.backward(grad.cpu().double())
            for name, got, ref in zip(["y", "dr", "dk", "dv", "dw", "du"], [y, *(x.grad for x in (*inputs, u))],
                                      [want, *(x.grad for x in leaves)]):
                err = ((got.detach().cpu().double() - ref).norm() / ref.norm()).item()
                if not err <= tol:
                    raise SystemExit(f"sanitize_wkv: N={size} {dtype} {name}: relative error {err:.2e} > {tol:.0e}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_wkv: N in {HEAD_SIZES}, fp32 and bf16, forward and backward on {device}: "
          f"ok, Bi-WKV calls {ops.dispatch_counts()}")


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
