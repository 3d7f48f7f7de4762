"""The dispatch rule of rwkvclip_dist.ops.bi_wkv, on CPU.

The rule's CUDA branch is exercised with a stand-in for the GPU's device properties (this machine
has no GPU), a kernel reported available and a self-test reported passed (no GPU can run it here;
tests/test_ops_self_test.py runs the self-test itself on CPU): what is checked is the decision, the
warnings and the counts, not the kernel (tests/test_cuda_bi_wkv.py runs that on a GPU).
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from rwkvclip_dist import ops
from rwkvclip_dist.ops import bi_wkv_cuda

KIB = 1024


@pytest.fixture
def fresh_rule(monkeypatch):
    """Forget earlier choices and warnings; the kernel counts as built and passes its self-test."""
    from rwkvclip_dist.ops import self_test

    monkeypatch.delenv("RWKVCLIP_BI_WKV", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "_choices", {})
    monkeypatch.setattr(ops, "_self_tests", {})
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(ops, "_fused", {})
    monkeypatch.setattr(bi_wkv_cuda, "is_available", lambda: True)
    monkeypatch.setattr(self_test, "run_self_test", lambda fn, path, *a: {"path": path, "passed": True})
    ops.reset_dispatch_counts()
    yield
    ops.reset_dispatch_counts()


def _gpu(monkeypatch, **props):
    monkeypatch.setattr(ops, "_device_properties", lambda index: SimpleNamespace(**props))


def _inputs(dtype=torch.float32, shape=(2, 9, 2, 16)):
    g = torch.Generator().manual_seed(0)
    r, k, v, w = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    return r, k, v, w, torch.randn(shape[2:], generator=g)


def test_counts_calls_per_implementation(fresh_rule):
    r, k, v, w, u = _inputs()
    ops.bi_wkv(r, k, v, w, u)
    ops.bi_wkv(r, k, v, w, u)
    assert ops.dispatch_counts() == {"cuda": 0, "triton": 0, "chunked": 2}
    ops.reset_dispatch_counts()
    assert ops.dispatch_counts() == {"cuda": 0, "triton": 0, "chunked": 0}


def test_shared_memory_beyond_the_device_limit_takes_the_chunked_path(fresh_rule, monkeypatch, caplog):
    """N=128 needs 160 KiB per block: an sm_86 GPU (99 KiB opt-in) gets the chunked path with one
    warning naming both numbers, while N=80 (91 KiB) still fits it; an H100 (227 KiB) takes both."""
    _gpu(monkeypatch, name="NVIDIA GeForce RTX 3090", major=8, minor=6, shared_memory_per_block_optin=99 * KIB)
    need = bi_wkv_cuda.shared_memory_bytes(128)
    assert 99 * KIB < need <= 163 * KIB and bi_wkv_cuda.shared_memory_bytes(80) <= 99 * KIB
    with caplog.at_level(logging.WARNING, logger="rwkvclip_dist.ops"):
        assert ops.prepare("cuda:0", torch.bfloat16, (128, 80, 128)) == {128: "chunked", 80: "cuda"}
        assert ops.prepare("cuda:0", torch.float32, (128,)) == {128: "chunked"}
    # (the Triton path, tried next, finds no CUDA device here and says so in a warning of its own)
    warnings = [rec.getMessage() for rec in caplog.records if "cuda path" in rec.getMessage()]
    assert len(warnings) == 1 and f"needs {need} bytes" in warnings[0] and f"allows {99 * KIB}" in warnings[0]
    _gpu(monkeypatch, name="NVIDIA H100", major=9, minor=0, shared_memory_per_block_optin=227 * KIB)
    assert ops.prepare("cuda:1", torch.bfloat16, (128, 80)) == {128: "cuda", 80: "cuda"}


def test_device_limit_from_the_capability_when_torch_does_not_report_it(fresh_rule, monkeypatch):
    _gpu(monkeypatch, name="old torch", major=8, minor=9)
    assert ops.prepare(0, torch.bfloat16, (128, 64)) == {128: "chunked", 64: "cuda"}
    assert ops.shared_memory_optin(SimpleNamespace(major=8, minor=0)) == 163 * KIB


def test_other_reasons_take_the_chunked_path(fresh_rule, monkeypatch, caplog):
    _gpu(monkeypatch, name="NVIDIA H100", major=9, minor=0, shared_memory_per_block_optin=227 * KIB)
    with caplog.at_level(logging.WARNING, logger="rwkvclip_dist.ops"):
        assert ops.prepare(0, torch.float64, (64,)) == {64: "chunked"}
        assert ops.prepare(0, torch.bfloat16, (32,)) == {32: "chunked"}
    assert any("float64" in rec.getMessage() for rec in caplog.records)
    assert any("head size 32" in rec.getMessage() for rec in caplog.records)
    monkeypatch.setattr(bi_wkv_cuda, "is_available", lambda: False)
    monkeypatch.setattr(bi_wkv_cuda, "unavailable_reason", lambda: "no CUDA toolkit to build the extension")
    assert ops.prepare(0, torch.float16, (64,)) == {64: "chunked"}
    assert ops.prepare("cpu", torch.float16, (64,)) == {64: "chunked"}


def test_autocast_decay_in_fp32_is_cast_to_the_inputs_dtype(fresh_rule):
    """Under autocast w arrives in fp32 beside bf16 r, k, v: cast (to r's dtype), not refused."""
    r, k, v, w, u = _inputs(torch.bfloat16)
    y = ops.bi_wkv(r, k, v, w.float(), u)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ops.bi_wkv(r, k, v, w, u))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(2, 9, 32)
        layer = torch.nn.Linear(32, 32)
        r = layer(x).view(2, 9, 2, 16)
        w = torch.zeros(1, 1, 32) + torch.tanh(x).float()  # the decay: fp32 parameter + LoRA
        assert r.dtype == torch.bfloat16 and w.dtype == torch.float32
        assert ops.bi_wkv(r, r, r, w.view(2, 9, 2, 16), u).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="k has dtype torch.float32, r has torch.bfloat16"):
        ops.bi_wkv(r, k.float(), v, w.view(2, 9, 2, 16), u)


def test_decision_is_made_once_and_never_traced(fresh_rule, monkeypatch):
    """Under torch.compile(fullgraph=True) the choice is a constant computed eagerly (no build is
    traced, no graph break), made once per (device, dtype, head size); the counts still advance per
    call of the compiled function."""
    made = []
    monkeypatch.setattr(ops, "_choose", lambda device, dtype, size: made.append((device, dtype, size)) or "chunked")

    def uses_rule(x):
        return x * (2 if ops._implementation("cuda:0", torch.float32, 64) == "cuda" else 3)

    compiled = torch.compile(uses_rule, fullgraph=True, backend="eager")
    assert compiled(torch.ones(2)).tolist() == [3.0, 3.0] and compiled(torch.ones(3)).sum() == 9
    assert made[0] == ("cuda:0", torch.float32, 64)
    r, k, v, w, u = _inputs(shape=(1, 8, 2, 16))
    op = torch.compile(lambda r: ops.bi_wkv(r, k, v, w, u), fullgraph=True, backend="eager")
    torch.testing.assert_close(op(r), ops.bi_wkv(r, k, v, w, u))
    op(r)
    assert ops.dispatch_counts() == {"cuda": 0, "triton": 0, "chunked": 3}


def test_the_rule_is_marked_constant_as_torch_marks_it_without_importing_dynamo():
    """ops marks ``_implementation`` itself (importing torch._dynamo costs ~1.3 s of CPU per process):
    the mark must be all that ``torch.compiler.assume_constant_result`` sets, and importing the ops
    (with the model) must not import dynamo."""
    import subprocess
    import sys

    def probe():
        pass

    before = dict(vars(probe))
    torch.compiler.assume_constant_result(probe)
    assert {k: v for k, v in vars(probe).items() if k not in before} == {ops.COMPILE_CONSTANT_MARK: True}
    assert getattr(ops._implementation, ops.COMPILE_CONSTANT_MARK) is True
    check = "import sys, rwkvclip_dist.ops, rwkvclip_dist.model; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          check=True).stdout.split() == ["False"]


def test_cuda_tensors_reach_the_fused_op(fresh_rule, monkeypatch):
    """Fake CUDA tensors (FakeTensorMode: shapes and devices without a GPU) go through the rule to
    rwkvclip::bi_wkv's fake implementation: bf16 r, k, v with an fp32 w (autocast's mix) included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _gpu(monkeypatch, name="NVIDIA H100", major=9, minor=0, shared_memory_per_block_optin=227 * KIB)
    with FakeTensorMode():
        r, k, v = (torch.randn(2, 9, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        w, u = torch.randn(2, 9, 2, 64, device="cuda"), torch.randn(2, 64, device="cuda")
        y = ops.bi_wkv(r, k, v, w, u)
        assert (y.shape, y.dtype, y.device.type) == (r.shape, torch.bfloat16, "cuda")
    assert ops.dispatch_counts() == {"cuda": 1, "triton": 0, "chunked": 0}


def test_meta_tensors_keep_what_the_fused_kernel_keeps():
    """tools/scaling.py counts activations on the meta device: Bi-WKV must save its inputs only (as the
    fused kernel does), not the chunked path's per-chunk intermediates, and compute nothing."""
    shape = (1, 40, 2, 64)
    inputs = [torch.empty(shape, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(4)]
    u = torch.empty(2, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        y = ops.bi_wkv(*inputs, u)
    assert y.shape == shape and y.is_meta
    assert saved == [(shape, torch.bfloat16)] * 4 + [((2, 64), torch.float32)]
