"""Fused operators behind one Python entry point each; the dispatch rule is written here, once.

``bi_wkv(r, k, v, w, u)``: Bi-WKV of SPEC section 4. r, k, v, w: [B, T, H, N] (w is the raw decay;
the per-step decay is exp(-exp(w))); u: [H, N]. Returns [B, T, H, N] in the input dtype, fp32 inside.

Dispatch rule:
- CUDA tensors in fp32/bf16/fp16 with a head size the kernel is compiled for (16, 64, 80, 128),
  whose shared memory fits the device's opt-in limit per block (N=128 needs 160 KiB: A100 and
  H100 have it, sm_86/89/120 GPUs with ~99 KiB do not), and the kernel builds
                                                       -> the fused CUDA kernel (``bi_wkv_cuda``).
- other CUDA tensors (float64, another head size, too little shared memory) or the kernel
  unavailable                                          -> the exact chunked PyTorch path, with one
  warning per reason that says why.
- CPU (any dtype)                                      -> the exact chunked PyTorch path.
- meta tensors (shapes only, e.g. tools/scaling.py's activation count)
                                                       -> the fused op's fake implementation, which
  keeps for backward what the kernel keeps (its inputs), not the chunked path's intermediates.

r, k and v must share a dtype. Under autocast the decay w arrives in fp32 beside bf16 r, k, v (its
parameter is fp32): w is cast to r's dtype, which is what a bf16 model without autocast computes.

The choice for a CUDA device is made once per (device, dtype, head size). ``prepare(device)`` makes
it eagerly (loading or building the extension): call it before ``torch.compile``. Under
``torch.compile`` an unmade choice is made through ``torch.compiler.assume_constant_result``, so
the build runs eagerly at trace time and is never traced. ``dispatch_counts()`` says how many calls
each implementation served in this process (activation checkpointing's recomputation counts too).
"""
from __future__ import annotations

import logging
from collections import Counter

import torch

from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked

__all__ = ["bi_wkv", "bi_wkv_chunked", "prepare", "dispatch_counts", "reset_dispatch_counts"]

log = logging.getLogger(__name__)
IMPLEMENTATIONS = ("cuda", "chunked")
_choices: dict[tuple[int, torch.dtype, int], str] = {}
_warned: set[str] = set()
_counts: Counter = Counter()
_fused = None  # bi_wkv_cuda.bi_wkv_cuda once a choice of "cuda" has imported it (no import while tracing)
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


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("Bi-WKV CUDA kernel not used (%s); running the chunked PyTorch path on CUDA tensors", reason)


def _device_properties(index: int):
    """The device's properties (a function of its own so that tests can stand in for a GPU)."""
    return torch.cuda.get_device_properties(index)


def shared_memory_optin(props) -> int:
    """Dynamic shared memory one block may opt into on the device of `props`."""
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    return _SMEM_OPTIN_FALLBACK.get((props.major, props.minor), 99 * 1024)


def _choose(index: int, dtype: torch.dtype, head_size: int) -> str:
    try:
        from rwkvclip_dist.ops import bi_wkv_cuda
    except ImportError as err:  # a broken install must not stop training: the chunked path is exact
        _warn_once(f"cannot import rwkvclip_dist.ops.bi_wkv_cuda: {err}")
        return "chunked"
    if dtype not in bi_wkv_cuda.SUPPORTED_DTYPES:
        _warn_once(f"dtype {dtype} is not compiled into the kernel")
        return "chunked"
    if head_size not in bi_wkv_cuda.SUPPORTED_HEAD_SIZES:
        _warn_once(f"head size {head_size} is not one of {bi_wkv_cuda.SUPPORTED_HEAD_SIZES}")
        return "chunked"
    props = _device_properties(index)
    need, have = bi_wkv_cuda.shared_memory_bytes(head_size), shared_memory_optin(props)
    if need > have:
        _warn_once(f"head size {head_size} needs {need} bytes of shared memory per block, "
                   f"{getattr(props, 'name', 'the GPU')} allows {have}")
        return "chunked"
    if not bi_wkv_cuda.is_available():
        _warn_once(bi_wkv_cuda.unavailable_reason())
        return "chunked"
    global _fused
    _fused = bi_wkv_cuda.bi_wkv_cuda
    return "cuda"


@torch.compiler.assume_constant_result
def _implementation(index: int, dtype: torch.dtype, head_size: int) -> str:
    """'cuda' or 'chunked' for CUDA tensors on device `index`; decided once, then remembered."""
    key = (index, dtype, head_size)
    if key not in _choices:
        _choices[key] = _choose(index, dtype, head_size)
    return _choices[key]


def prepare(device: torch.device | str | int = "cuda", dtype: torch.dtype = torch.bfloat16,
            head_sizes: tuple[int, ...] = (64,)) -> dict[int, str]:
    """Decide (building or loading the extension) which implementation serves CUDA tensors of
    `dtype` and each head size on `device`, before any call; returns {head size: 'cuda'|'chunked'}.
    Call it before ``torch.compile`` so that no build happens during tracing."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return {n: "chunked" for n in head_sizes}
    index = torch.cuda.current_device() if device.index is None else device.index
    return {n: _implementation(index, dtype, n) for n in head_sizes}


def dispatch_counts() -> dict[str, int]:
    """Calls of ``bi_wkv`` per implementation in this process, e.g. {'cuda': 96, 'chunked': 0}."""
    return {name: int(_counts[name]) for name in IMPLEMENTATIONS}


def reset_dispatch_counts() -> None:
    _counts.clear()


def bi_wkv(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    _check_inputs(r, k, v, w, u)
    if w.dtype != r.dtype:
        w = w.to(r.dtype)
    if r.is_cuda and _implementation(r.device.index, r.dtype, r.shape[-1]) == "cuda":
        _counts["cuda"] += 1
        return _fused(r, k, v, w, u)
    if r.is_meta:
        from rwkvclip_dist.ops import bi_wkv_cuda  # defines the op and its fake; builds nothing

        return torch.ops.rwkvclip.bi_wkv(r, k, v, w, u.to(torch.float32))
    _counts["chunked"] += 1
    return bi_wkv_chunked(r, k, v, w, u)
