"""What the v2 kernels (csrc/bi_wkv/sweep_fused.cuh) change, executed on CPU threads.

The CPU emulation (csrc/testing/cpu_emulation.cpp, a stand-in for the GPU this machine lacks) runs
the kernel source; tests/test_cuda_kernel_on_cpu.py runs its accuracy matrix on both versions.
Here: each output written once in its dtype (the byte counter), d(w) from the row outputs where
its cancellation is largest (slow decays over a long sequence, bf16), and fp32's backward being
v1's.
"""
from __future__ import annotations

import torch

from wkv_emulation import chunked_reference, inputs, kernels, rel  # noqa: F401 (kernels: the fixture)


def test_v2_writes_each_output_once_in_its_dtype(kernels):
    """Counted bytes at T=20 (a ragged second chunk), N=16, bf16, one (batch, head); E = 20 x 16
    elements of 2 bytes. Forward: one block reads each input once per direction and stores y twice
    (direction 0 its share, direction 1 the sum), reading it once; no zero-fill, atomics or cast.
    Backward: four sweeps, each input read by all four; dr, dk, dv stored by two sweeps and read
    by one, d(w) stored once; the fp32 running sums of d(w) stored by three sweeps and read by
    three; no stored states. u is read per chunk where the bonus is added (16 rows x N each)."""
    r, k, v, w, dy, u = inputs(1, 20, 1, 16, torch.bfloat16, seed=1)
    kernels.take_traffic()
    kernels.set_traffic_counting(True)
    try:
        kernels.forward_v2(r, k, v, w, u)
        kernels.backward_v2(dy, r, k, v, w, u)
    finally:
        kernels.set_traffic_counting(False)
    got = {(p, t): tuple(counts) for p, t, *counts in kernels.take_traffic()}
    e, chunk_u, u1 = 20 * 16 * 2, 16 * 16 * 4, 16 * 4
    fwd, bwd = "forward: v2 kernel", "backward: v2 kernel"
    twice_written = (e, 2 * e, e, e)
    want = {**{(fwd, t): (2 * e, 0, e, 0) for t in "rkvw"}, (fwd, "y"): twice_written,
            (fwd, "u"): (2 * chunk_u, 0, u1, 0),
            **{(bwd, t): (4 * e, 0, e, 0) for t in ("r", "k", "v", "w", "dy")},
            **{(bwd, t): twice_written for t in ("dr", "dk", "dv")}, (bwd, "dw"): (0, e, 0, e),
            (bwd, "dw sums"): (3 * 2 * e, 3 * 2 * e, 2 * e, 2 * e), (bwd, "u"): (6 * chunk_u, 0, u1, 0),
            (bwd, "du"): (0, u1, 0, u1), ("backward: du sum", "du"): (u1, u1, u1, u1)}
    assert got == want


def test_v2_decay_gradient_with_slow_decays_over_a_long_sequence(kernels):
    """d(log w_p) = Z - S_z(>=p) - P_x(<=p) + ... subtracts sums over the whole sequence: largest
    when nothing decays (per-step decay ~0.99988) and T is long. The row outputs it sums come from
    3xTF32 products in v2's backward (one TF32 product each gave 2e-2 at T=197): within the 5e-3
    of bf16 here, as the other outputs (fp16's longer mantissa only shrinks the rounding)."""
    dtype = torch.bfloat16
    r, k, v, _, dy, u = inputs(1, 1025, 1, 16, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    w = (-9.0 + 0.1 * torch.randn(r.shape, generator=g)).to(dtype)
    want_y, want_grads = chunked_reference(r, k, v, w, u, dy)
    assert rel(kernels.forward_v2(r, k, v, w, u), want_y) <= 5e-3
    for name, got, want in zip("rkvwu", kernels.backward_v2(dy, r, k, v, w, u), want_grads):
        assert rel(got, want) <= 5e-3, f"d{name}: {rel(got, want):.2e}"


def test_v2_backward_of_fp32_inputs_is_v1s(kernels):
    """fp32 keeps v1's stored-state d(w) (v2's form would lose fp32's 1e-5): the same bits."""
    r, k, v, w, dy, u = inputs(1, 20, 2, 16, torch.float32, seed=2)
    for a, b in zip(kernels.backward_v2(dy, r, k, v, w, u), kernels.backward(dy, r, k, v, w, u)):
        assert torch.equal(a, b)
