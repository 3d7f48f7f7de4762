"""Fused operators behind one Python entry point each; the dispatch rule is written here, once.

``bi_wkv(r, k, v, w, u)``: Bi-WKV of SPEC section 4. r, k, v, w: [B, T, H, N] (w is the raw decay;
the per-step decay is exp(-exp(w))); u: [H, N]. Returns [B, T, H, N] in the input dtype, fp32 inside.

Paths: ``cuda`` (the fused CUDA kernel, ``bi_wkv_cuda``), ``triton`` (the fused Triton kernel,
``bi_wkv_triton``; on CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``) and
``chunked`` (exact PyTorch, any device and dtype). ``RWKVCLIP_BI_WKV`` picks the rule:
- ``auto`` (default): CUDA tensors try cuda, then triton, then chunked; CPU tensors try triton when
  the interpreter is on, else chunked. A fused path is tried when it can serve the tensors (cuda:
  fp32/bf16/fp16, a head size compiled in (16, 64, 80, 128) whose shared memory fits the device's
  opt-in limit per block (N=128 needs 160 KiB: A100 and H100 have it, sm_86/89/120 GPUs with ~99 KiB
  do not), and the extension builds; triton: fp32/bf16/fp16, N 16-128, triton importable), and it
  serves them only once it passed the numerical self-test (``ops/self_test.py``: forward and all
  five gradients against the chunked path in float64). A path that cannot serve or fails the test
  is skipped with one warning line that says why (device, shapes and worst error for a failed test).
- ``cuda`` / ``triton``: that path only; if it cannot serve the tensors or fails its self-test, the
  first call raises RuntimeError instead of falling back.
- ``chunked``: the chunked path everywhere.
- meta tensors (shapes only, e.g. tools/scaling.py's activation count): the fused op's fake
  implementation, which keeps for backward what the kernel keeps (its inputs), not the chunked
  path's intermediates; counted nowhere.

r, k and v must share a dtype. Under autocast the decay w arrives in fp32 beside bf16 r, k, v (its
parameter is fp32): w is cast to r's dtype, which is what a bf16 model without autocast computes.

The choice is made once per (device, dtype, head size), self-test included. ``prepare(device)``
makes it eagerly (loading or building the extension): call it before ``torch.compile``. Under
``torch.compile`` an unmade choice is made as ``torch.compiler.assume_constant_result`` marks it, so
the build and self-test run eagerly at trace time and are never traced. ``dispatch_counts()`` says
how many calls each path served in this process (activation checkpointing's recomputation counts
too); ``report()`` gives the paths chosen and the self-tests' outcomes (written to metrics.json).
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import torch

from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked

__all__ = ["bi_wkv", "bi_wkv_chunked", "prepare", "dispatch_counts", "reset_dispatch_counts", "report"]

log = logging.getLogger(__name__)
IMPLEMENTATIONS = ("cuda", "triton", "chunked")
MODES = ("auto", "cuda", "triton", "chunked")
MODE_VARIABLE = "RWKVCLIP_BI_WKV"
_choices: dict[tuple[str, torch.dtype, int], str] = {}
_self_tests: dict[str, dict] = {}  # "<path> <device> <dtype> N=<n>" -> the self-test's outcome
_warned: set[str] = set()
_counts: Counter = Counter()
_fused: dict = {}  # path -> its function, once chosen (no import while tracing)
# Opt-in shared memory per block by compute capability, for a torch that does not report it
_SMEM_OPTIN_FALLBACK = {(8, 0): 163 * 1024, (9, 0): 227 * 1024}


def _check_inputs(r, k, v, w, u) -> None:
    if r.dim() != 4:
        raise ValueError(f"bi_wkv: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    for name, x in (("k", k), ("v", v), ("w", w)):
        if x.shape != r.shape:
            raise ValueError(f"bi_wkv: {name} has shape {tuple(x.shape)}, expected r's shape {tuple(r.shape)}")
        if x.device != r.device:
            raise ValueError(f"bi_wkv: {name} is on {x.device}, r on {r.device}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != r.dtype:
            raise TypeError(f"bi_wkv: {name} has dtype {x.dtype}, r has {r.dtype}; r, k and v must share a dtype")
    if u.shape != r.shape[2:]:
        raise ValueError(f"bi_wkv: u has shape {tuple(u.shape)}, expected [H, N] = {tuple(r.shape[2:])}")
    if r.shape[1] < 1:
        raise ValueError("bi_wkv: the sequence must hold at least one token (T >= 1)")


def _warn_once(reason: str, line: str) -> None:
    """One warning line per reason (the first (device, dtype, head size) it applied to names it)."""
    if reason not in _warned:
        _warned.add(reason)
        log.warning("Bi-WKV: %s", line)


def mode() -> str:
    """The rule RWKVCLIP_BI_WKV asks for: auto (default), cuda, triton or chunked."""
    value = os.environ.get(MODE_VARIABLE, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={value!r} is not one of {', '.join(MODES)}")
    return value


def _device_properties(index: int):
    """The device's properties (a function of its own so that tests can stand in for a GPU)."""
    return torch.cuda.get_device_properties(index)


def shared_memory_optin(props) -> int:
    """Dynamic shared memory one block may opt into on the device of `props`."""
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    return _SMEM_OPTIN_FALLBACK.get((props.major, props.minor), 99 * 1024)


def _cuda_function(device: torch.device, dtype: torch.dtype, head_size: int):
    """(bi_wkv_cuda, '') when the CUDA kernel can serve these tensors, else (None, why not)."""
    try:
        from rwkvclip_dist.ops import bi_wkv_cuda
    except ImportError as err:  # a broken install must not stop training: other paths are exact
        return None, f"cannot import rwkvclip_dist.ops.bi_wkv_cuda: {err}"
    if device.type != "cuda":
        return None, f"the CUDA kernel takes CUDA tensors, these are on {device}"
    if dtype not in bi_wkv_cuda.SUPPORTED_DTYPES:
        return None, f"dtype {dtype} is not compiled into the CUDA kernel"
    if head_size not in bi_wkv_cuda.SUPPORTED_HEAD_SIZES:
        return None, f"head size {head_size} is not one of the CUDA kernel's {bi_wkv_cuda.SUPPORTED_HEAD_SIZES}"
    props = _device_properties(device.index)
    need, have = bi_wkv_cuda.shared_memory_bytes(head_size), shared_memory_optin(props)
    if need > have:
        return None, (f"head size {head_size} needs {need} bytes of shared memory per block, "
                      f"{getattr(props, 'name', 'the GPU')} allows {have}")
    if not bi_wkv_cuda.is_available():
        return None, bi_wkv_cuda.unavailable_reason()
    return bi_wkv_cuda.bi_wkv_cuda, ""


def _triton_function(device: torch.device, dtype: torch.dtype, head_size: int):
    """(bi_wkv_triton, '') when the Triton kernel can serve these tensors, else (None, why not)."""
    from rwkvclip_dist.ops import bi_wkv_triton

    if dtype not in bi_wkv_triton.SUPPORTED_DTYPES:
        return None, f"dtype {dtype} is not one of the Triton kernel's"
    low, high = bi_wkv_triton.HEAD_SIZES
    if not low <= head_size <= high:
        return None, f"head size {head_size} is outside the Triton kernel's {low}..{high}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return None, "no CUDA device is visible to torch"
    reason = bi_wkv_triton.unavailable_reason(device)
    return (None, reason) if reason else (bi_wkv_triton.bi_wkv_triton, "")


_CANDIDATES = {"cuda": _cuda_function, "triton": _triton_function}


def _candidates(device: torch.device, wanted: str) -> tuple[str, ...]:
    if wanted != "auto":
        return () if wanted == "chunked" else (wanted,)
    if device.type == "cuda":
        return ("cuda", "triton")
    from rwkvclip_dist.ops.bi_wkv_triton import interpreted

    return ("triton",) if interpreted() else ()


def _choose(device: str, dtype: torch.dtype, head_size: int) -> str:
    """The first candidate path that can serve (device, dtype, head size) and passes its self-test."""
    from rwkvclip_dist.ops.self_test import run_self_test

    wanted, where = mode(), torch.device(device)
    what = f"{device} {str(dtype).removeprefix('torch.')} N={head_size}"
    for path in _candidates(where, wanted):
        fn, reason = _CANDIDATES[path](where, dtype, head_size)
        if fn is None:
            if wanted == path:
                raise RuntimeError(f"{MODE_VARIABLE}={path}, but the {path} path cannot serve {what}: {reason}")
            _warn_once(f"{path}: {reason}", f"{path} path not used for {what} ({reason})")
            continue
        outcome = run_self_test(fn, path, where, dtype, head_size)
        _self_tests[f"{path} {what}"] = outcome
        if outcome["passed"]:
            _fused[path] = fn
            return path
        found = outcome.get("error") or f"worst relative error {outcome['worst_error']} in {outcome['worst']}"
        line = (f"{path} path refused for {what}: self-test at shape {outcome['shape']} (B, T, H, N) "
                f"found {found}, tolerance {outcome['tolerance']}")
        if wanted == path:
            raise RuntimeError(f"{MODE_VARIABLE}={path}: {line}")
        outcome["fell_back"] = True
        _warn_once(line, line + "; trying the next path")
    return "chunked"


def _implementation(device: str, dtype: torch.dtype, head_size: int) -> str:
    """'cuda', 'triton' or 'chunked' for tensors on `device` ('cuda:0', 'cpu'); decided once, then remembered."""
    key = (device, dtype, head_size)
    if key not in _choices:
        _choices[key] = _choose(device, dtype, head_size)
    return _choices[key]


# What ``torch.compiler.assume_constant_result`` does, without the import of torch._dynamo it makes
# (~1.3 s of CPU in every process that imports the ops: tools, evaluation, stage-0 ranks); dynamo reads
# the mark when it traces a call. tests/test_ops_dispatch.py checks that the decorator still sets only this.
COMPILE_CONSTANT_MARK = "_dynamo_marked_constant"
setattr(_implementation, COMPILE_CONSTANT_MARK, True)


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return device.type


def prepare(device: torch.device | str | int = "cuda", dtype: torch.dtype = torch.bfloat16,
            head_sizes: tuple[int, ...] = (64,)) -> dict[int, str]:
    """Decide (building or loading the extension, running the self-tests) which path serves
    tensors of `dtype` and each head size on `device`, before any call; returns {head size: path}.
    Call it before ``torch.compile`` so that no build or self-test happens during tracing."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    key = _device_key(device)
    return {n: _implementation(key, dtype, n) for n in head_sizes}


def report() -> dict:
    """{'path': the path chosen (a string, or {'<device> <dtype> N=<n>': path} when they differ),
    'self_test': {'<path> <device> <dtype> N=<n>': outcome}}: what metrics.json records."""
    chosen = {f"{d} {str(t).removeprefix('torch.')} N={n}": p for (d, t, n), p in sorted(
        _choices.items(), key=lambda item: str(item[0]))}
    paths = set(chosen.values()) or {"chunked"}
    return {"path": paths.pop() if len(paths) == 1 else chosen, "self_test": dict(_self_tests)}


def dispatch_counts() -> dict[str, int]:
    """Calls of ``bi_wkv`` per implementation in this process, e.g. {'cuda': 96, 'chunked': 0}."""
    return {name: int(_counts[name]) for name in IMPLEMENTATIONS}


def reset_dispatch_counts() -> None:
    _counts.clear()


def bi_wkv(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    _check_inputs(r, k, v, w, u)
    if w.dtype != r.dtype:
        w = w.to(r.dtype)
    if r.is_meta:
        from rwkvclip_dist.ops import bi_wkv_cuda  # defines the op and its fake; builds nothing

        return torch.ops.rwkvclip.bi_wkv(r, k, v, w, u.to(torch.float32))
    path = _implementation(_device_key(r.device), r.dtype, r.shape[-1])
    _counts[path] += 1
    if path == "chunked":
        return bi_wkv_chunked(r, k, v, w, u)
    return _fused[path](r, k, v, w, u)
