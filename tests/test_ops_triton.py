"""The Triton Bi-WKV kernels, executed by Triton's interpreter on CPU tensors: the code a GPU runs.

Forward and all five gradients against float64 (the direct formula for the output, the float64
chunked path, itself checked against the formula and gradcheck in test_ops_bi_wkv.py, for the
gradients), at small sizes because the interpreter is slow. Triton reads TRITON_INTERPRET when it is
imported, which this test session has long done: the tests run in one child pytest process started
with the variable set (``test_under_the_interpreter``), and are skipped in the parent. On a GPU
(tools/gpu_check.sh), ``test_on_the_gpu`` runs the compiled kernels against the same references.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from rwkvclip_dist import ops
from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked
from rwkvclip_dist.ops.bi_wkv_reference import bi_wkv_float64
from rwkvclip_dist.ops.bi_wkv_triton import bi_wkv_triton
from wkv_inputs import random_inputs, relative_error

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}
CHILD = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(not CHILD, reason="runs in test_under_the_interpreter's child process")


@pytest.mark.skipif(CHILD, reason="this is the child")
def test_under_the_interpreter():
    from conftest import REPO, dist_env

    env = dist_env(TRITON_INTERPRET="1")
    env.pop("RWKVCLIP_BI_WKV", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x",
                           "--durations=5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "\n9 passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.fixture
def forced_triton(monkeypatch):
    monkeypatch.setenv("RWKVCLIP_BI_WKV", "triton")
    monkeypatch.setattr(ops, "_choices", {})
    monkeypatch.setattr(ops, "_self_tests", {})
    ops.reset_dispatch_counts()
    yield
    ops.reset_dispatch_counts()


def run(fn, inputs, grad):
    """Output and the five gradients of fn on fresh leaves of `inputs`."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y = fn(*leaves)
    y.backward(grad.to(y.dtype))
    return [y.detach()] + [x.grad for x in leaves]


def check_against_float64(inputs, tolerance):
    rounded = [x.double() for x in inputs]
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = run(bi_wkv_triton, inputs, grad.to(inputs[0].dtype))
    expected = run(bi_wkv_chunked, rounded, grad.to(inputs[0].dtype).double())
    assert relative_error(expected[0], bi_wkv_float64(*rounded)) < 1e-12
    assert [x.dtype for x in got] == [x.dtype for x in inputs[:1] + inputs]
    for name, a, b in zip(("y", "d r", "d k", "d v", "d w", "d u"), got, expected):
        assert relative_error(a, b) <= tolerance, name


@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 37, 1, 16), (1, 9, 1, 80), (1, 2, 1, 128)],
                         ids=["T1", "odd-T-batch2", "N80", "N128"])
@in_child
def test_fp32_matches_float64(shape):
    """T=1, T not a multiple of the chunk over several chunks, N not a power of two, the largest N."""
    check_against_float64(list(random_inputs(*shape, dtype=torch.float32, seed=sum(shape))), TOLERANCE[torch.float32])


@in_child
def test_bf16_matches_float64():
    inputs = list(random_inputs(1, 37, 2, 16, dtype=torch.bfloat16, seed=2))
    inputs[4] = inputs[4].float()  # u is an fp32 parameter beside bf16 activations
    check_against_float64(inputs, TOLERANCE[torch.bfloat16])


@in_child
def test_long_sequence_with_slow_decays():
    """97 tokens (7 chunks), half the channels barely decaying: the fp32 state carries them across."""
    inputs = list(random_inputs(1, 97, 1, 16, dtype=torch.float32, seed=3))
    inputs[3][..., :8] = -8.0
    check_against_float64(inputs, TOLERANCE[torch.float32])


@in_child
def test_empty_batch_and_non_contiguous_inputs():
    r, k, v, w, u = random_inputs(0, 5, 1, 16, dtype=torch.float32)
    leaves = [x.requires_grad_() for x in (r, k, v, w, u)]
    y = bi_wkv_triton(*leaves)
    y.sum().backward()
    assert y.shape == (0, 5, 1, 16) and all(x.grad.shape == x.shape for x in leaves)
    base = random_inputs(1, 2, 19, 16, dtype=torch.float32, seed=4)  # [B, H, T, N], viewed as [B, T, H, N]
    views = [x.transpose(1, 2) for x in base[:4]] + [torch.randn(16, 2).t()]
    assert not any(x.is_contiguous() for x in views)
    torch.testing.assert_close(bi_wkv_triton(*views), bi_wkv_chunked(*views), rtol=1e-5, atol=1e-5)


@in_child
def test_two_runs_are_identical():
    inputs = list(random_inputs(1, 21, 1, 16, dtype=torch.float32, seed=5))
    grad = torch.randn(inputs[0].shape)
    first, second = run(bi_wkv_triton, inputs, grad), run(bi_wkv_triton, inputs, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@in_child
def test_registered_path_under_compile_and_checkpointing(forced_triton):
    """RWKVCLIP_BI_WKV=triton makes ops.bi_wkv run the kernel on CPU tensors, after its self-test;
    torch.compile (through the op's fake and autograd registrations) and activation checkpointing
    (which runs the forward twice) give the eager results."""
    inputs = list(random_inputs(1, 18, 1, 16, dtype=torch.float32, seed=6))
    grad = torch.randn(inputs[0].shape)
    assert ops.prepare("cpu", torch.float32, (16,)) == {16: "triton"}
    assert ops.report()["self_test"]["triton cpu float32 N=16"]["passed"]
    eager = run(ops.bi_wkv, inputs, grad)
    assert ops.dispatch_counts() == {"cuda": 0, "triton": 1, "chunked": 0}
    compiled = torch.compile(ops.bi_wkv, backend="aot_eager", fullgraph=True)
    for got in (run(compiled, inputs, grad), run(lambda *a: checkpoint(ops.bi_wkv, *a, use_reentrant=False),
                                                 inputs, grad)):
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ops.dispatch_counts()["triton"] >= 4 and ops.dispatch_counts()["chunked"] == 0


@pytest.mark.skipif(CHILD or (not torch.cuda.is_available() and os.environ.get("RWKVCLIP_REQUIRE_GPU") != "1"),
                    reason="needs a CUDA GPU (tools/gpu_check.sh sets RWKVCLIP_REQUIRE_GPU=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (3, 197, 2, 64), (2, 77, 3, 80), (1, 600, 2, 128)])
def test_on_the_gpu(shape, dtype):
    inputs = [x.cuda() for x in random_inputs(*shape, dtype=dtype, seed=sum(shape))]
    inputs[4] = inputs[4].float()
    rounded = [x.double() for x in inputs]
    grad = torch.randn(shape, device="cuda", dtype=torch.float64)
    got = run(bi_wkv_triton, inputs, grad.to(dtype))
    expected = run(bi_wkv_chunked, rounded, grad.to(dtype).double())
    for name, a, b in zip(("y", "d r", "d k", "d v", "d w", "d u"), got, expected):
        assert relative_error(a, b) <= TOLERANCE[dtype], name


@pytest.mark.slow
@pytest.mark.skipif(CHILD, reason="the interpreter compiles nothing")
def test_kernels_compile_for_hopper_without_a_gpu():
    """What the interpreter cannot show: Triton's compiler lowers both kernels to sm_90 PTX and the
    wheel's ptxas assembles them (bf16, N=80: masked key and value blocks)."""
    from tool_loader import tool_module

    rows = tool_module("triton_kernel_report").compile_kernels("bf16", 80, 90)
    assert [row.kernel for row in rows] == ["forward bf16 N=80", "backward bf16 N=80"]
    assert all(row.arch == "sm_90" and 0 < row.registers <= 255 for row in rows)
