"""The CUDA kernel source itself, executed on CPU threads, against the float64 references.

csrc/testing/cpu_emulation.cpp compiles csrc/bi_wkv/sweep_kernel.cuh (v1), sweep_fused.cuh (v2)
and bi_wkv_host.h with the host compiler (both versions run through the tests marked `version`): each CUDA thread of a block is a std::thread, __syncthreads a std::barrier,
atomicAdd a std::atomic_ref (a stand-in for the GPU, which this machine lacks). So this runs the
very lines the GPU runs, through the same host code that allocates and orders the launches:
indexing, padding of ragged chunks, both directions, the stored states, d(w) and d(u) are all
checked, and a missing barrier shows up as a race between real threads. What it cannot check:
warp-level behaviour, the GPU memory model, launch configuration and speed (tests/test_cuda_bi_wkv.py).
Gradient references: autograd through the exact chunked path in float64.
"""
from __future__ import annotations

import pytest
import torch

from wkv_emulation import (TOLERANCE, VERSIONS, chunked_reference, inputs, kernels, own_backward,  # noqa: F401
                           rel, versioned)

from rwkvclip_dist.ops.bi_wkv_reference import bi_wkv_float64

_REFERENCES: dict = {}  # (tokens, size, dtype) -> (inputs, y, gradients) in float64

@pytest.mark.parametrize(
    "tokens, size, dtype",
    [(1, 16, torch.float32), (2, 16, torch.float32), (15, 16, torch.float32), (16, 64, torch.float32),
     (17, 80, torch.float32), (49, 16, torch.float32), (65, 64, torch.float32), (40, 128, torch.float32),
     (197, 16, torch.float32), (33, 64, torch.bfloat16), (33, 80, torch.float16),
     # long enough that the fp32 state crosses 36-64 chunk boundaries
     (577, 64, torch.float32), (1025, 80, torch.float32), (1025, 64, torch.bfloat16)],
)
@pytest.mark.parametrize("version", VERSIONS)
def test_kernel_source_matches_reference(kernels, version, tokens, size, dtype):
    key = (tokens, size, dtype)
    if key not in _REFERENCES:  # both versions compare with one float64 reference
        pairs = 2 if tokens <= 256 else 1  # long sequences: one (batch, head) keeps the float64 reference quick
        case = inputs(pairs, tokens, pairs, size, dtype, seed=tokens * 100 + size)
        _REFERENCES[key] = case, bi_wkv_float64(*case[:4], case[5]), chunked_reference(*case[:4], case[5], case[4])[1]
    (r, k, v, w, dy, u), want_y, want_grads = _REFERENCES[key]

    forward, backward = versioned(kernels, version)
    y = forward(r, k, v, w, u)
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and rel(y, want_y) <= tol, f"y: {rel(y, want_y):.2e}"
    if not own_backward(version, dtype):
        return
    grads = backward(dy, r, k, v, w, u)
    for name, got, want in zip("rkvwu", grads, want_grads):
        assert got.dtype == (torch.float32 if name == "u" else dtype)
        assert rel(got, want) <= tol, f"d{name}: {rel(got, want):.2e} (T={tokens}, N={size}, {dtype})"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("raw_decay", [6.0, -12.0])
def test_kernel_source_at_decay_extremes(kernels, version, raw_decay):
    """Every step at the clamp (log decay -60: the in-chunk reference factors span e^-900) or with
    almost no decay (log decay -6e-6: the state only grows): finite and exact."""
    r, k, v, _, dy, u = inputs(1, 70, 2, 64, torch.float32, seed=7)
    w = torch.full_like(r, raw_decay)
    want_y, want_grads = chunked_reference(r, k, v, w, u, dy)
    forward, backward = versioned(kernels, version)
    y = forward(r, k, v, w, u)
    grads = backward(dy, r, k, v, w, u) if own_backward(version, r.dtype) else want_grads
    assert rel(y, want_y) <= 1e-5
    for name, got, want in zip("rkvwu", grads, want_grads):
        assert torch.isfinite(got).all() and rel(got, want) <= 1e-5, f"d{name}: {rel(got, want):.2e}"


@pytest.mark.parametrize("version", VERSIONS)
def test_slow_decays_over_long_sequences_keep_fp32_accuracy(kernels, version):
    """Channels that barely decay (per-step decay ~0.99988) carry the state through 64 chunks. With
    the tensor cores' truncating sums (the emulation's default, as measured on the hardware),
    accumulating each chunk's update straight onto the state biased it towards zero by ~12
    truncations per chunk: 1.3e-5 at T=1025 (2.5e-5 at 2049), over the fp32 target. The update is
    now summed apart and added in fp32 (tile_mma.cuh, mma_add_to): ~7e-7."""
    r, k, v, _, dy, u = inputs(1, 1025, 1, 16, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    w = -9.0 + 0.1 * torch.randn(r.shape, generator=g)
    want_y, want_grads = chunked_reference(r, k, v, w, u, dy)
    forward, backward = versioned(kernels, version)
    y = forward(r, k, v, w, u)
    grads = backward(dy, r, k, v, w, u) if own_backward(version, r.dtype) else want_grads
    assert rel(y, want_y) <= 1e-5, f"y: {rel(y, want_y):.2e}"
    for name, got, want in zip("rkvwu", grads, want_grads):
        assert rel(got, want) <= 1e-5, f"d{name}: {rel(got, want):.2e}"


def test_truncating_accumulation_model(kernels):
    """The stand-in's tensor-core sums truncate (round toward zero) by default: on positive data
    every element of a product lands at or below the exact value, while rounding to nearest lands
    on both sides of it."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(16, 64, generator=g), torch.rand(64, 16, generator=g)

    def tf32(x):  # __float_to_tf32 of positive values: round half away from zero to 10 mantissa bits
        return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32).double()

    want = tf32(a) @ tf32(b)  # exact products of the TF32 operands, summed in float64
    assert kernels.set_truncating_accumulation(False) is True  # the default is on
    nearest = kernels.tile_product(a, b, False, False, 0).double()
    assert kernels.set_truncating_accumulation(True) is False
    truncated = kernels.tile_product(a, b, False, False, 0).double()
    assert (truncated <= want).all() and (truncated < want).any()
    assert (nearest > want).any() and (nearest < want).any()


@pytest.mark.parametrize("version", VERSIONS)
def test_misaligned_inputs_are_copied_before_the_vector_loads(kernels, version):
    """The chunk loads read 16-byte vectors (the stand-in of __ldg reports a misaligned one): the
    host copies a tensor whose data starts off a 16-byte boundary, and the result is unchanged."""
    r, k, v, w, dy, u = inputs(1, 20, 2, 16, torch.float32, seed=4)

    def shifted(x):  # same values, data 4 bytes past an aligned start
        storage = torch.empty(x.numel() + 1, dtype=x.dtype)
        view = storage[1:].view(x.shape)
        view.copy_(x)
        assert view.data_ptr() % 16 != 0
        return view

    forward, backward = versioned(kernels, version)
    want = [forward(r, k, v, w, u), *backward(dy, r, k, v, w, u)]
    moved = [shifted(x) for x in (r, k, v, w, dy)]
    got = [forward(*moved[:4], u), *backward(moved[4], *moved[:4], u)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("version", VERSIONS)
def test_empty_batch_launches_no_grid(kernels, version):
    """B = 0: zero-size outputs, and no launch (CUDA refuses a grid of zero blocks; so does the
    stand-in)."""
    r, k, v, w, dy, u = inputs(0, 5, 2, 16, torch.bfloat16, seed=0)
    forward, backward = versioned(kernels, version)
    y = forward(r, k, v, w, u)
    grads = backward(dy, r, k, v, w, u)
    assert y.shape == r.shape and [g.shape for g in grads] == [r.shape] * 4 + [u.shape]
    assert not grads[4].any()


@pytest.mark.parametrize("version", VERSIONS)
def test_kernel_source_is_bitwise_repeatable(kernels, version):
    """Three runs on real threads give identical bits: the atomics add in a fixed pattern (two terms
    onto zero), the shuffles sum in a fixed order, and a missing barrier would show up here as a
    run-to-run difference."""
    dtype = torch.float32 if version == "v1" else torch.bfloat16  # v2's fp32 backward is v1's
    r, k, v, w, dy, u = inputs(2, 65, 2 if version == "v1" else 1, 64, dtype, seed=11)
    forward, backward = versioned(kernels, version)
    runs = [(forward(r, k, v, w, u), *backward(dy, r, k, v, w, u)) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("depth", [16, 64])
@pytest.mark.parametrize("b_col_major", [False, True])
def test_tensor_core_tile_product(kernels, depth, b_col_major):
    """tile_mma.cuh's warp product through the WMMA stand-in, which, like the hardware, drops the
    13 low mantissa bits of TF32 operands: one TF32 product (the bf16/fp16 path) is good to about
    1e-4, which would miss the fp32 target; the 3xTF32 split (the fp32 path) reaches fp32 accuracy
    (about 1e-6 for K=64 with the tensor cores' truncating sums, 1e-7 rounding to nearest)."""
    g = torch.Generator().manual_seed(depth)
    a, b = torch.randn(16, depth, generator=g), torch.randn(depth, 16, generator=g)
    want = a.double() @ b.double()
    single = kernels.tile_product(a, b, b_col_major, False, 0)
    split = kernels.tile_product(a, b, b_col_major, True, 0)
    assert 1e-5 < rel(single, want) < 1e-3
    assert rel(split, want) < 3e-6


def test_tensor_core_tiles_must_be_aligned(kernels):
    """WMMA needs 32-byte aligned tiles: the stand-in reports a misaligned one instead of computing."""
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    with pytest.raises(RuntimeError, match="not 32-byte aligned"):
        kernels.tile_product(a, b, False, True, 4)  # 16 bytes past the boundary


def test_host_checks_name_the_argument(kernels):
    r, k, v, w, dy, u = inputs(1, 5, 2, 16, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="k has shape"):
        kernels.forward(r, k[:, :4].contiguous(), v, w, u)
    with pytest.raises(RuntimeError, match="grad_output has dtype"):
        kernels.backward(dy.double(), r, k, v, w, u)
    with pytest.raises(RuntimeError, match="no kernel compiled for head size N=24"):
        r24 = torch.randn(1, 5, 2, 24)
        kernels.forward(r24, r24, r24, r24, torch.randn(2, 24))


def test_traffic_counter_counts_what_the_source_moves(kernels):
    """The emulation's byte counter against what the kernel source is written to move, at T=20
    (a ragged second chunk), N=16, fp32, one (batch, head), E = 20 x 16 elements of 4 bytes: every
    sweep reads each input once per direction and no padding row; the atomics read and write each
    output element once per direction; the query sweep stores one N x N fp32 state per chunk and
    direction, which the key sweep reads twice (tensor-core tiles and the d(w) pairs); the bonus u
    is re-read per chunk (16 rows x N); the host zero-fills and sums once. First touches per pass:
    each input, output and u once, the states once for both of their key-sweep reads."""
    r, k, v, w, dy, u = inputs(1, 20, 1, 16, torch.float32, seed=1)
    kernels.take_traffic()
    assert kernels.set_traffic_counting(True) is False
    try:
        kernels.forward(r, k, v, w, u)
        kernels.backward(dy, r, k, v, w, u)
    finally:
        kernels.set_traffic_counting(False)
    got = {(p, t): tuple(counts) for p, t, *counts in kernels.take_traffic()}
    e, state, chunk_u, u1 = 20 * 16 * 4, 16 * 16 * 4, 16 * 16 * 4, 16 * 4
    read_twice, atomics, zero = (2 * e, 0, e, 0), (2 * e, 2 * e, e, e), (0, e, 0, e)
    want = {("forward: zero-fill", "y"): zero, ("forward: sweep", "y"): atomics,
            **{("forward: sweep", t): read_twice for t in "rkvw"}, ("forward: sweep", "u"): (2 * chunk_u, 0, u1, 0),
            **{("backward: zero-fill", t): zero for t in ("dr", "dk", "dv", "dw")},
            **{("backward: query sweep", t): read_twice for t in ("k", "v", "w", "dy")},
            ("backward: query sweep", "dr"): atomics,
            ("backward: query sweep", "states"): (0, 2 * 2 * state, 0, 2 * 2 * state),
            ("backward: query sweep", "u"): (2 * chunk_u, 0, u1, 0),
            **{("backward: key sweep", t): read_twice for t in ("r", "k", "v", "w", "dy")},
            **{("backward: key sweep", t): atomics for t in ("dk", "dv", "dw")},
            ("backward: key sweep", "states"): (2 * 2 * 2 * state, 0, 2 * 2 * state, 0),
            ("backward: key sweep", "u"): (4 * chunk_u, 0, u1, 0),
            ("backward: key sweep", "du"): (0, u1, 0, u1), ("backward: du sum", "du"): (u1, u1, u1, u1)}
    assert got == want
    assert kernels.take_traffic() == []  # taken means cleared
    kernels.forward(r, k, v, w, u)
    assert kernels.take_traffic() == []  # off: nothing counted


def test_traffic_tool_compares_with_the_minimal_bytes(kernels):
    """tools/bench_wkv_traffic.py's table at a tiny shape, v1 and v2 side by side: each ratio is the
    version's counted bytes (the counters, checked here and in test_cuda_kernel_v2_on_cpu.py) over
    inputs read once and outputs written once; occupancy from ptxas figures per version: 128
    registers allow 2 blocks of 256 threads per SM, 80 allow 3 unless shared memory allows fewer."""
    from tool_loader import tool_module

    from rwkvclip_dist.ops.ptxas_report import KernelResources

    tool = tool_module("bench_wkv_traffic")
    shape = tool.Shape("tiny", 20, 2, 16)
    lines, ratios = tool.traffic_table(kernels, [shape], torch.bfloat16)
    least = sum(tool.minimal_bytes(shape, torch.bfloat16).values())
    for version in ("v1", "v2"):
        counted = sum(c[2] + c[3] for c in tool.count_traffic(kernels, shape, torch.bfloat16, version).values())
        assert ratios[version] == pytest.approx(counted / least)
        assert any(line.startswith(f"| {version} | **both** |") and line.endswith(f"**{ratios[version]:.2f}** |")
                   for line in lines)
    assert ratios["v2"] < ratios["v1"] / 3
    assert tool.minimal_bytes(shape, torch.bfloat16) == {"forward": 5 * 320 * 2 + 64, "backward": 9 * 320 * 2 + 128}
    assert tool.blocks_per_sm(128, 70_000) == 2 and tool.blocks_per_sm(80, 70_000) == 3
    assert tool.blocks_per_sm(80, 120_000) == 1 and tool.blocks_per_sm(32, 1_000) == 8
    rows = [KernelResources("sweep<N=64, key>", "sm_90", 128, 0, 8, 8, 8),
            KernelResources("sweep<N=64, forward>", "sm_90", 80, 0, 0, 0, 0),
            KernelResources("sweep<N=80, key>", "sm_90", 128, 0, 48, 40, 40),
            KernelResources("sweep<N=128, key>", "sm_90", 128, 0, 96, 64, 64),
            KernelResources("sweep<N=64, key>", "sm_80", 200, 0, 0, 900, 900),
            KernelResources("v2<N=64, backward, bf16>", "sm_90", 80, 0, 0, 0, 0),
            KernelResources("v2<N=80, forward, fp32>", "sm_90", 120, 0, 8, 4, 4)]
    _, figures = tool.occupancy_table(rows, {64: 70_000, 80: 90_000, 128: 160_000})
    # the fewest blocks at N=64; the most spilled bytes at N 64/80, sm_90 only
    assert figures == {"v1": (2, 80), "v2": (3, 8)}
