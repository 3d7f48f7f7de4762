"""The numerical self-test a fused Bi-WKV path passes before rwkvclip_dist.ops trusts it.

A fused kernel that builds can still be wrong on a given GPU (a miscompiled kernel, a driver, too
little shared memory at launch) and return finite garbage; a run would then train on it for days.
So before a path serves a (device, dtype, head size), its forward and backward run once at a small
shape that exercises the edges: B=1, H=2, an odd T that spans several chunks of every path (16 for
the fused kernels, 8 for the chunked one) and ends in a partial chunk, the real N and dtype, strong
and very slow decays side by side. The output and all five gradients are compared with the chunked
path in float64 on the same (rounded) inputs.

Tolerances (relative to each tensor's largest magnitude) sit between rounding and breakage: SPEC
section 4 asks the kernels for 1e-5 (fp32) and 5e-3 (bf16) and tests/test_ops_triton.py holds the
Triton kernel to those; a wrong index or a missed chunk gives errors of order 1. The self-test allows
10x the fp32 figure and 2x the 16-bit ones, so that a kernel which is right but rounds differently
on some GPU is not refused, and anything structurally wrong is.
"""
from __future__ import annotations

import time

import torch

from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked

__all__ = ["run_self_test", "TOLERANCE", "TOKENS"]

TOKENS = 53  # 3 full chunks of 16 and a partial one of 5; 6 chunks of 8 and one of 5
HEADS = 2
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NAMES = ("y", "d r", "d k", "d v", "d w", "d u")


def _inputs(head_size: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(20)
    shape = (1, TOKENS, HEADS, head_size)
    r, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    w = torch.rand(shape, generator=gen, dtype=torch.float64) * 10 - 5  # per-step decay from ~1 to 1e-64
    w[..., ::4] = -6.0  # channels that carry information across the whole sequence
    u = torch.randn(HEADS, head_size, generator=gen, dtype=torch.float64)
    return [r, k, v, w, u]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    error = (a.detach().double().cpu() - b).abs().max().item()
    return error / max(b.abs().max().item(), 1e-30)


def run_self_test(fn, path: str, device: torch.device, dtype: torch.dtype, head_size: int) -> dict:
    """Run `fn` (the fused path `path`) forward and backward on `device` in `dtype`; returns the
    outcome as a JSON-ready dict with ``passed``, ``worst_error`` and where it was worst, or
    ``error`` when the path raised."""
    inputs = _inputs(head_size)
    tolerance = TOLERANCE.get(dtype, 1e-4)
    outcome = {"path": path, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
               "head_size": head_size, "shape": [1, TOKENS, HEADS, head_size], "tolerance": tolerance}
    # The reference sees the inputs the kernel sees: rounded to the dtype, then widened.
    rounded = [x.to(dtype).double() for x in inputs[:4]] + [inputs[4]]
    reference = [x.clone().requires_grad_() for x in rounded]
    grad = torch.randn(rounded[0].shape, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    y_ref = bi_wkv_chunked(*reference)
    y_ref.backward(grad.to(dtype).double())
    expected = [y_ref.detach()] + [x.grad for x in reference]
    start = time.perf_counter()
    try:
        fused = [x.to(device=device, dtype=dtype).requires_grad_() for x in inputs[:4]]
        fused.append(inputs[4].to(device=device, dtype=torch.float32).requires_grad_())
        y = fn(*fused)
        y.backward(grad.to(device=device, dtype=y.dtype))
        got = [y] + [x.grad for x in fused]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - any failure of the kernel (launch, build, shape) refuses it
        outcome.update(passed=False, worst_error=None, error=f"{type(err).__name__}: {err}".splitlines()[0],
                       seconds=round(time.perf_counter() - start, 4))
        return outcome
    outcome["seconds"] = round(time.perf_counter() - start, 4)
    errors = {}
    for name, a, b in zip(NAMES, got, expected):
        if a is None or tuple(a.shape) != tuple(b.shape):
            errors[name] = float("inf")
            continue
        error = _relative(a, b)
        errors[name] = error if error == error else float("inf")  # NaN counts as the worst error
    worst = max(errors, key=errors.get)
    outcome.update(passed=errors[worst] <= tolerance, worst_error=_json_number(errors[worst]), worst=worst,
                   errors={k: _json_number(float(f"{v:.3g}")) for k, v in errors.items()})
    return outcome


def _json_number(value: float) -> float | str:
    """JSON has no infinity: a non-finite error is written as a word."""
    return value if value != float("inf") else "non-finite"
