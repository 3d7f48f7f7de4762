"""Fused operators behind one Python entry point each; the dispatch rule is written here, once.

``bi_wkv(r, k, v, w, u)``: Bi-WKV of SPEC section 4. r, k, v, w: [B, T, H, N] (w is the raw decay;
the per-step decay is exp(-exp(w))); u: [H, N]. Returns [B, T, H, N] in the input dtype, fp32 inside.

Dispatch rule:
- CUDA tensors and the compiled kernel is available  -> the fused CUDA kernel (``bi_wkv_cuda``).
- CUDA tensors, kernel unavailable                     -> the exact chunked PyTorch path, with one
  warning that says why the kernel is unavailable.
- CPU (any dtype)                                      -> the exact chunked PyTorch path.
"""
from __future__ import annotations

import logging

import torch

from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked

__all__ = ["bi_wkv", "bi_wkv_chunked"]

log = logging.getLogger(__name__)
_warned_unavailable = False


def _check_inputs(r, k, v, w, u) -> None:
    if r.dim() != 4:
        raise ValueError(f"bi_wkv: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    for name, x in (("k", k), ("v", v), ("w", w)):
        if x.shape != r.shape:
            raise ValueError(f"bi_wkv: {name} has shape {tuple(x.shape)}, expected r's shape {tuple(r.shape)}")
        if x.device != r.device:
            raise ValueError(f"bi_wkv: {name} is on {x.device}, r on {r.device}")
    if u.shape != r.shape[2:]:
        raise ValueError(f"bi_wkv: u has shape {tuple(u.shape)}, expected [H, N] = {tuple(r.shape[2:])}")
    if r.shape[1] < 1:
        raise ValueError("bi_wkv: the sequence must hold at least one token (T >= 1)")


def _cuda_kernel():
    """The CUDA implementation if it is built and usable here, else None (warned once)."""
    global _warned_unavailable
    try:
        from rwkvclip_dist.ops import bi_wkv_cuda
    except ImportError as err:  # the kernel module is optional until it is built
        reason = f"cannot import rwkvclip_dist.ops.bi_wkv_cuda ({err})"
        kernel = None
    else:
        kernel = bi_wkv_cuda if bi_wkv_cuda.is_available() else None
        reason = None if kernel else bi_wkv_cuda.unavailable_reason()
    if kernel is None and not _warned_unavailable:
        log.warning("Bi-WKV CUDA kernel unavailable (%s); using the chunked PyTorch path on CUDA tensors", reason)
        _warned_unavailable = True
    return kernel


def bi_wkv(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    _check_inputs(r, k, v, w, u)
    if r.is_cuda:
        kernel = _cuda_kernel()
        if kernel is not None:
            return kernel.bi_wkv_cuda(r, k, v, w, u)
    return bi_wkv_chunked(r, k, v, w, u)
