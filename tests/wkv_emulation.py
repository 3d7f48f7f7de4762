"""Shared by the tests that run the CUDA kernel source in the CPU emulation
(csrc/testing/cpu_emulation.cpp, a stand-in for the GPU this machine lacks): the module-scoped
build, inputs, the float64 references and the error measure."""
from __future__ import annotations

import pytest
import torch

from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked
from rwkvclip_dist.ops.build import ToolkitNotFound, build_cpu_emulation

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}
VERSIONS = ("v1", "v2")  # RWKVCLIP_BI_WKV_KERNEL: both are compiled, both must pass


@pytest.fixture(scope="module")
def kernels():
    try:
        return build_cpu_emulation()
    except ToolkitNotFound as err:
        pytest.skip(f"the emulation needs the CUDA headers of a toolkit: {err}")


def inputs(batch, tokens, heads, size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, tokens, heads, size)
    r, k, v, dy = (torch.randn(shape, generator=g) for _ in range(4))
    w = torch.rand(shape, generator=g) * 9 - 6  # per-step decays from ~1 down to e^-20
    w = torch.where(torch.rand(shape, generator=g) < 0.02, torch.full_like(w, 4.5), w)  # past the clamp
    u = torch.randn(heads, size, generator=g)
    return [x.to(dtype) for x in (r, k, v, w, dy)] + [u]


def versioned(kernels, version):
    """(forward, backward) of one kernel version: v1's bindings, or v2's (sweep_fused.cuh)."""
    suffix = "_v2" if version == "v2" else ""
    return getattr(kernels, "forward" + suffix), getattr(kernels, "backward" + suffix)


def own_backward(version, dtype):
    """False where the version's backward is another's: v2 runs v1's for fp32 inputs (bitwise, as
    tests/test_cuda_kernel_v2_on_cpu.py checks), so the v1 cases cover it."""
    return version == "v1" or dtype != torch.float32


def chunked_reference(r, k, v, w, u, dy):
    """(y, [dr, dk, dv, dw, du]) of the exact chunked path in float64, gradients by autograd."""
    leaves = [x.double().requires_grad_() for x in (r, k, v, w, u)]
    y = bi_wkv_chunked(*leaves)
    return y.detach(), torch.autograd.grad(y, leaves, dy.double())


def rel(got, want, floor=1e-6):
    scale = max(want.double().norm().item(), floor * want.numel() ** 0.5)
    return (got.double() - want.double()).norm().item() / scale
