"""CI check without a GPU: compile the CUDA extension for sm_80 and sm_90 with ptxas statistics.

Fails on any compile or link error, and when a kernel is missing or asks for more shared memory
than its architecture has; prints registers, shared memory and spills of every kernel. The build
directory is named by a hash of the sources and flags (rwkvclip_dist/ops/build.py), so a rerun
with unchanged sources is a ninja no-op that reuses the recorded log.
"""
from __future__ import annotations

import pytest

from rwkvclip_dist.ops.bi_wkv_cuda import SUPPORTED_HEAD_SIZES
from rwkvclip_dist.ops.build import BuildConfig, ToolkitNotFound, build, find_cuda_home, format_report, ptxas_report

ARCHS = ("8.0", "9.0")
# maximum dynamic + static shared memory per block (CUDA programming guide, compute capabilities)
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
REGISTERS_PER_SM = 65536
THREADS = 256  # kThreads in csrc/bi_wkv/sweep_params.h


@pytest.fixture(scope="module")
def compiled():
    try:
        find_cuda_home()
    except ToolkitNotFound as err:
        pytest.skip(f"no CUDA toolkit on this machine: {err}")
    module, build_dir = build(BuildConfig(archs=ARCHS, ptxas_verbose=True, jobs=2))
    return module, ptxas_report((build_dir / "build.log").read_text(errors="replace"))


def test_every_kernel_compiles_for_both_architectures(compiled, capsys):
    module, rows = compiled
    smem = {n: module.shared_memory_bytes(n) for n in module.head_sizes()}
    with capsys.disabled():
        print("\n" + format_report(rows, smem))
    assert tuple(module.head_sizes()) == SUPPORTED_HEAD_SIZES
    expected = {(f"sweep<N={n}, {kind}>", f"sm_{a.replace('.', '')}")
                for n in SUPPORTED_HEAD_SIZES for kind in ("forward", "query", "key") for a in ARCHS}
    assert {(row.kernel, row.arch) for row in rows} == expected


def test_resources_fit_the_architectures(compiled):
    module, rows = compiled
    for row in rows:
        n = int(row.kernel.split("N=")[1].split(",")[0])
        total = module.shared_memory_bytes(n) + row.static_smem
        assert total <= SMEM_LIMIT[row.arch], f"{row.kernel} on {row.arch} needs {total} bytes of shared memory"
        assert row.registers * THREADS <= REGISTERS_PER_SM, f"{row.kernel} on {row.arch}: {row.registers} registers"


def test_extension_exposes_the_bindings(compiled):
    module, _ = compiled
    assert callable(module.forward) and callable(module.backward)


def test_benchmark_baseline_compiles():
    """The two-scan baseline of tools/bench_wkv.py (csrc/bench/two_scan_baseline.cu) is built only
    on a GPU machine; compile it here for sm_90 so that a GPU session does not meet a compile error."""
    from tool_loader import tool_module

    try:
        find_cuda_home()
    except ToolkitNotFound as err:
        pytest.skip(f"no CUDA toolkit on this machine: {err}")
    module = tool_module("bench_wkv").build_two_scan(("9.0",))
    assert callable(module.forward) and callable(module.backward)
