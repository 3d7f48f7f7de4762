"""Host-side logic of the CUDA Bi-WKV op, on CPU: toolkit discovery, argument checks, the
torch.library registration, the fake (meta) implementation and the autograd wiring.

The kernels themselves need a GPU (tests/test_cuda_bi_wkv.py). Here fake CUDA tensors
(FakeTensorMode) and meta tensors stand in for device memory: they carry shapes, dtypes and devices
through the real op registration, the real checks and the real autograd formula.
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rwkvclip_dist.ops import bi_wkv_cuda as op
from rwkvclip_dist.ops.build import BuildConfig, ToolkitNotFound, extensions_dir, find_cuda_home
from rwkvclip_dist.ops.ptxas_report import ptxas_report

B, T, H, N = 2, 5, 3, 16


def _fake_cuda_inputs(dtype=torch.bfloat16, shape=(B, T, H, N)):
    r, k, v, w = (torch.randn(*shape, device="cuda", dtype=dtype) for _ in range(4))
    return r, k, v, w, torch.randn(shape[2], shape[3], device="cuda")


def test_op_is_registered_with_its_schema():
    schema = str(torch.ops.rwkvclip.bi_wkv.default._schema)
    assert schema.startswith("rwkvclip::bi_wkv(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u) -> Tensor")
    assert "rwkvclip::bi_wkv_backward" in str(torch.ops.rwkvclip.bi_wkv_backward.default._schema)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_implementation_gives_shape_dtype_device(dtype):
    with FakeTensorMode():
        r, k, v, w, u = _fake_cuda_inputs(dtype)
        y = op.bi_wkv_cuda(r, k, v, w, u)
        assert (y.shape, y.dtype, y.device.type) == (r.shape, dtype, "cuda")
        grads = torch.ops.rwkvclip.bi_wkv_backward(y, r, k, v, w, u)
        assert [g.shape for g in grads] == [r.shape] * 4 + [u.shape]
        assert [g.dtype for g in grads] == [dtype] * 4 + [torch.float32]


def test_autograd_formula_returns_one_gradient_per_input():
    """Meta tensors run the registered autograd formula through the backward op's fake kernel."""
    leaves = [torch.randn(B, T, H, N, device="meta", dtype=torch.float16, requires_grad=True) for _ in range(4)]
    u = torch.randn(H, N, device="meta", requires_grad=True)
    torch.ops.rwkvclip.bi_wkv(*leaves, u).sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype for x in leaves)
    assert u.grad.shape == (H, N) and u.grad.dtype == torch.float32


def test_fake_tracing_records_the_custom_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode(allow_non_fake_inputs=False):
        inputs = _fake_cuda_inputs(torch.float32)
        graph = make_fx(op.bi_wkv_cuda, tracing_mode="fake")(*inputs)
    assert "rwkvclip.bi_wkv.default" in str(graph.code)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda a: a.update(k=a["k"][:, :-1]), ValueError, "k has shape"),
        (lambda a: a.update(v=a["v"].float()), TypeError, "v has dtype torch.float32"),
        (lambda a: a.update(w=a["w"].to(torch.int32)), TypeError, "w must be a floating-point"),
        (lambda a: a.update(u=a["u"][:2]), ValueError, "u has shape (2, 16), expected [H, N] = [3, 16]"),
        (lambda a: a.update(r=a["r"][0]), ValueError, "r must be [B, T, H, N]"),
        (lambda a: a.update(r=a["r"].double(), k=a["k"].double(), v=a["v"].double(), w=a["w"].double()),
         TypeError, "r has dtype torch.float64"),
    ],
)
def test_bad_arguments_are_named(mutate, error, message):
    with FakeTensorMode():
        args = dict(zip("rkvwu", _fake_cuda_inputs()))
        mutate(args)
        with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            op.bi_wkv_cuda(args["r"], args["k"], args["v"], args["w"], args["u"])


def test_unsupported_head_size_and_empty_sequence_are_named():
    with FakeTensorMode():
        with pytest.raises(ValueError, match=r"head size N=24 \(r.shape\[3\]\)"):
            op.bi_wkv_cuda(*_fake_cuda_inputs(shape=(B, T, H, 24)))
        with pytest.raises(ValueError, match="T=0 tokens"):
            op.bi_wkv_cuda(*_fake_cuda_inputs(shape=(B, 0, H, N)))


def test_cpu_tensors_are_refused_by_name():
    r, k, v, w = (torch.randn(B, T, H, N) for _ in range(4))
    with pytest.raises(ValueError, match="r must be a CUDA tensor, got device cpu"):
        op.bi_wkv_cuda(r, k, v, w, torch.randn(H, N))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_unavailable_without_a_device_and_says_why():
    assert op.is_available() is False
    assert "no CUDA device" in op.unavailable_reason()


def test_kernel_version_comes_from_the_environment(monkeypatch):
    """RWKVCLIP_BI_WKV_KERNEL picks v2 (default) or v1 on every call; anything else is named."""
    monkeypatch.delenv(op.KERNEL_VARIABLE, raising=False)
    assert op.kernel_version() == "v2"
    monkeypatch.setenv(op.KERNEL_VARIABLE, "V1")
    assert op.kernel_version() == "v1"
    monkeypatch.setenv(op.KERNEL_VARIABLE, "v3")
    with pytest.raises(ValueError, match="RWKVCLIP_BI_WKV_KERNEL='v3': expected one of v2, v1"):
        op.kernel_version()


def test_benchmark_rows_run_forward_and_backward_on_their_kernel_version(monkeypatch):
    """tools/bench_wkv.py times "ours" (v2) and "ours v1" in one run: the variable is set around a
    row's whole forward + backward (autograd calls the backward op later), then restored."""
    from tool_loader import tool_module

    bench = tool_module("bench_wkv")
    monkeypatch.delenv(op.KERNEL_VARIABLE, raising=False)
    with bench.kernel_version("ours v1"):
        assert op.kernel_version() == "v1"
    with bench.kernel_version("ours"):
        assert op.kernel_version() == "v2"
    assert op.KERNEL_VARIABLE not in os.environ


def _toolkit_or_skip() -> Path:
    try:
        return find_cuda_home()
    except ToolkitNotFound as err:
        pytest.skip(f"no CUDA toolkit on this machine: {err}")


def test_toolkit_found_through_an_nvcc_wrapper_outside_it(tmp_path, monkeypatch):
    """The layout torch gets wrong: nvcc on PATH is a script in a prefix without libcudart."""
    toolkit = _toolkit_or_skip()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit / "bin" / "nvcc"} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    found = find_cuda_home()
    assert found == toolkit.resolve() and any(found.glob("lib*/libcudart.so*")) | any(
        found.glob("targets/*/lib/libcudart.so*"))


def test_cuda_home_that_is_not_a_toolkit_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(ToolkitNotFound, match=f"CUDA_HOME={tmp_path} is not a CUDA toolkit"):
        find_cuda_home()


def test_no_nvcc_anywhere_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("nvcc") is None
    with pytest.raises(ToolkitNotFound, match="nvcc is not on PATH"):
        find_cuda_home()


def test_cache_dir_and_build_name(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch"))
    monkeypatch.delenv("RWKVCLIP_EXTENSIONS_DIR", raising=False)
    assert extensions_dir() == tmp_path / "torch"
    monkeypatch.setenv("RWKVCLIP_EXTENSIONS_DIR", str(tmp_path / "ours"))
    assert extensions_dir() == tmp_path / "ours"
    # the name follows anything that changes the binary, so a stale build is never loaded
    assert BuildConfig().name() == BuildConfig().name()
    assert BuildConfig(archs=("8.0",)).name() != BuildConfig().name()
    assert BuildConfig(ptxas_verbose=True).name() == BuildConfig().name()  # same binary, longer log
    assert "-Xptxas=-v" in BuildConfig(ptxas_verbose=True).cuda_flags()
    flags = BuildConfig().cuda_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags


PTXAS_SAMPLE = """\
ptxas info    : 28 bytes gmem, 224 bytes cmem[4]
ptxas info    : Compiling entry function '_ZN8rwkvclip12sweep_kernelILi80ELNS_5SweepE2EEEvNS_11SweepParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN8rwkvclip12sweep_kernelILi80ELNS_5SweepE2EEEvNS_11SweepParamsE
    16 bytes stack frame, 12 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 182 registers, used 1 barriers, 464 bytes cmem[0]
ptxas info    : Compile time = 326.631 ms
ptxas info    : Compiling entry function '_ZN8rwkvclip12fused_kernelILi64ELNS_5FusedE1ELi1EEEvNS_11SweepParamsES2_' for 'sm_90'
ptxas info    : Function properties for _ZN8rwkvclip12fused_kernelILi64ELNS_5FusedE1ELi1EEEvNS_11SweepParamsES2_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 920 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6othervPf' for 'sm_80'
ptxas info    : Function properties for _Z6othervPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, 1024 bytes smem, 360 bytes cmem[0]
"""


def test_ptxas_report_parses_every_kernel():
    key, fused, other = ptxas_report(PTXAS_SAMPLE)
    assert (key.kernel, key.arch, key.registers, key.static_smem) == ("sweep<N=80, key>", "sm_90", 182, 0)
    assert (fused.kernel, fused.registers, fused.spill_stores) == ("v2<N=64, backward, bf16>", 80, 0)
    assert (key.stack, key.spill_stores, key.spill_loads) == (16, 12, 28)
    assert (other.kernel, other.arch, other.registers, other.static_smem, other.spill_stores) == (
        "_Z6othervPf", "sm_80", 12, 1024, 0)
