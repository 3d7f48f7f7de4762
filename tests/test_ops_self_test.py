"""The self-test that gates a fused Bi-WKV path (rwkvclip_dist/ops/self_test.py), on CPU.

No GPU here: a fused path is registered with a deliberately wrong stand-in for a GPU kernel (the
chunked path with the bonus u scaled by 0.9, finite and plausible numbers, as a miscompiled kernel
would give) in the Triton path's place, which the rule tries on CPU tensors under TRITON_INTERPRET=1.
It must be refused with one warning line, and a real training run must train on the chunked path
with metrics.json saying why.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from rwkvclip_dist import ops
from rwkvclip_dist.ops import bi_wkv_chunked, bi_wkv_triton


def wrong_bi_wkv(r, k, v, w, u):
    """Stand-in for a broken GPU kernel: a wrong bonus term, everything else right."""
    return bi_wkv_chunked(r, k, v, w, u * 0.9)


def raising_bi_wkv(r, k, v, w, u):
    """Stand-in for a kernel whose launch fails on the device."""
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.fixture
def fresh_rule(monkeypatch):
    """A fresh rule under TRITON_INTERPRET=1, with the Triton path reported available (the variable
    is set after triton was imported in this process, which the real check refuses)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("RWKVCLIP_BI_WKV", raising=False)
    monkeypatch.setattr(ops, "_choices", {})
    monkeypatch.setattr(ops, "_self_tests", {})
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(ops, "_fused", {})
    monkeypatch.setattr(bi_wkv_triton, "unavailable_reason", lambda device=None: "")
    ops.reset_dispatch_counts()
    yield monkeypatch
    ops.reset_dispatch_counts()


def test_a_wrong_fused_path_is_refused_with_one_warning(fresh_rule, caplog):
    fresh_rule.setattr(bi_wkv_triton, "bi_wkv_triton", wrong_bi_wkv)
    with caplog.at_level(logging.WARNING, logger="rwkvclip_dist.ops"):
        assert ops.prepare("cpu", torch.float32, (16, 16)) == {16: "chunked"}
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 1
    assert "triton path refused for cpu float32 N=16" in lines[0] and "[1, 53, 2, 16]" in lines[0]
    assert "worst relative error" in lines[0] and "tolerance 0.0001" in lines[0]
    outcome = ops.report()["self_test"]["triton cpu float32 N=16"]
    assert not outcome["passed"] and outcome["fell_back"] and outcome["worst_error"] > 1e-2
    assert outcome["worst"] in ("y", "d r", "d k", "d v", "d u") and outcome["seconds"] >= 0
    assert ops.report()["path"] == "chunked"
    r = torch.randn(1, 5, 2, 16)
    ops.bi_wkv(r, r, r, r, torch.randn(2, 16))
    assert ops.dispatch_counts() == {"cuda": 0, "triton": 0, "chunked": 1}


def test_the_right_function_passes_and_serves(fresh_rule):
    """The same rule with a correct function (the chunked path itself) accepts it."""
    fresh_rule.setattr(bi_wkv_triton, "bi_wkv_triton", lambda *a: bi_wkv_chunked(*a))
    assert ops.prepare("cpu", torch.bfloat16, (16,)) == {16: "triton"}
    outcome = ops.report()["self_test"]["triton cpu bfloat16 N=16"]
    assert outcome["passed"] and outcome["worst_error"] <= outcome["tolerance"] == 1e-2


def test_forced_paths_make_a_failure_an_error(fresh_rule):
    fresh_rule.setattr(bi_wkv_triton, "bi_wkv_triton", raising_bi_wkv)
    ops.prepare("cpu", torch.float32, (16,))  # auto: refused, falls back
    assert "illegal memory access" in ops.report()["self_test"]["triton cpu float32 N=16"]["error"]
    fresh_rule.setattr(ops, "_choices", {})
    fresh_rule.setenv("RWKVCLIP_BI_WKV", "triton")
    with pytest.raises(RuntimeError, match="RWKVCLIP_BI_WKV=triton: triton path refused for cpu float32 N=16"):
        ops.prepare("cpu", torch.float32, (16,))
    fresh_rule.setenv("RWKVCLIP_BI_WKV", "cuda")
    with pytest.raises(RuntimeError, match="the cuda path cannot serve cpu float32 N=16: the CUDA kernel takes"):
        ops.prepare("cpu", torch.float32, (16,))
    fresh_rule.setenv("RWKVCLIP_BI_WKV", "chunked")
    assert ops.prepare("cpu", torch.float32, (16,)) == {16: "chunked"} and ops.report()["self_test"].keys() == {
        "triton cpu float32 N=16"}
    fresh_rule.setenv("RWKVCLIP_BI_WKV", "fused")
    with pytest.raises(ValueError, match="RWKVCLIP_BI_WKV='fused' is not one of auto, cuda, triton, chunked"):
        ops.prepare("cpu", torch.float32, (32,))


def test_gpu_order_is_cuda_then_triton_then_chunked(fresh_rule):
    """Stand-ins for both GPU paths and for their self-tests' verdicts (no GPU here): each path is
    tried in order and a refused one hands over to the next."""
    from rwkvclip_dist.ops import self_test

    verdicts = {}
    fresh_rule.setitem(ops._CANDIDATES, "cuda", lambda device, dtype, size: (wrong_bi_wkv, ""))
    fresh_rule.setitem(ops._CANDIDATES, "triton", lambda device, dtype, size: (bi_wkv_chunked, ""))
    fresh_rule.setattr(self_test, "run_self_test", lambda fn, path, *a: {
        "path": path, "passed": verdicts[path], "worst_error": 0.5, "worst": "y", "shape": [1, 53, 2, 64],
        "tolerance": 1e-2})
    for cuda, triton, chosen in ((True, True, "cuda"), (False, True, "triton"), (False, False, "chunked")):
        verdicts.update(cuda=cuda, triton=triton)
        fresh_rule.setattr(ops, "_choices", {})
        assert ops.prepare("cuda:0", torch.bfloat16, (64,)) == {64: chosen}


SITECUSTOMIZE = '''
"""Registers a wrong stand-in for a GPU kernel as the fused Triton path (tests/test_ops_self_test.py)."""
from rwkvclip_dist.ops import bi_wkv_chunked, bi_wkv_triton


def wrong_bi_wkv(r, k, v, w, u):
    return bi_wkv_chunked(r, k, v, w, u * 0.9)


bi_wkv_triton.bi_wkv_triton = wrong_bi_wkv
'''


@pytest.mark.slow
def test_training_refuses_a_wrong_kernel_and_trains_on_the_chunked_path(tmp_path, demo_data):
    """train.py on the demo recipe (tiny, 2 steps, one process) with the wrong stand-in installed by a
    sitecustomize module: the run finishes on the chunked path, and metrics.json, the log and
    TensorBoard say that the Triton path failed its self-test."""
    from conftest import REPO, dist_env, train_args

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = dist_env(TRITON_INTERPRET="1", RWKVCLIP_BI_WKV="auto")
    env["PYTHONPATH"] = f"{hook}:{env['PYTHONPATH']}"
    run = tmp_path / "run"
    args = train_args(run, demo_data, "train.steps=2", "logging.tensorboard=true", "checkpoint.every_steps=0")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["bi_wkv"]["path"] == "chunked"
    outcome = metrics["bi_wkv"]["self_test"]["triton cpu float32 N=16"]
    assert outcome["passed"] is False and outcome["fell_back"] and outcome["worst_error"] > 1e-2
    assert metrics["bi_wkv_calls"]["triton"] == 0 and metrics["bi_wkv_calls"]["chunked"] > 0
    assert "triton path refused for cpu float32 N=16" in proc.stderr
    events = b"".join(p.read_bytes() for p in (run / "tensorboard").glob("events.*"))
    assert b"bi_wkv/self_test_passed/triton_cpu_float32_N=16" in events and b"fell_back" in events
