"""Fused operators behind one Python entry point each; the dispatch rule is written here, once.

``bi_wkv(r, k, v, w, u)``: Bi-WKV of SPEC section 4. r, k, v, w: [B, T, H, N] (w is the raw decay;
the per-step decay is exp(-exp(w))); u: [H, N]. Returns [B, T, H, N] in the input dtype, fp32 inside.

Dispatch rule:
- CUDA tensors in fp32/bf16/fp16 with a head size the kernel is compiled for (16, 64, 80, 128) and
  the kernel builds                                    -> the fused CUDA kernel (``bi_wkv_cuda``).
- other CUDA tensors (float64, another head size) or the kernel unavailable
                                                       -> the exact chunked PyTorch path, with one
  warning that says why.
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


def _warn_once(reason: str) -> None:
    global _warned_unavailable
    if not _warned_unavailable:
        log.warning("Bi-WKV CUDA kernel not used (%s); running the chunked PyTorch path on CUDA tensors", reason)
        _warned_unavailable = True


def _cuda_kernel(r: torch.Tensor):
    """The CUDA implementation if it is built and fits these inputs, else None (warned once)."""
    try:
        from rwkvclip_dist.ops import bi_wkv_cuda
    except ImportError as err:  # a broken install must not stop training: the chunked path is exact
        _warn_once(f"cannot import rwkvclip_dist.ops.bi_wkv_cuda: {err}")
        return None
    if r.dtype not in bi_wkv_cuda.SUPPORTED_DTYPES:
        _warn_once(f"dtype {r.dtype} is not compiled into the kernel")
        return None
    if r.shape[-1] not in bi_wkv_cuda.SUPPORTED_HEAD_SIZES:
        _warn_once(f"head size {r.shape[-1]} is not one of {bi_wkv_cuda.SUPPORTED_HEAD_SIZES}")
        return None
    if not bi_wkv_cuda.is_available():
        _warn_once(bi_wkv_cuda.unavailable_reason())
        return None
    return bi_wkv_cuda


def bi_wkv(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    _check_inputs(r, k, v, w, u)
    if r.is_cuda:
        kernel = _cuda_kernel(r)
        if kernel is not None:
            return kernel.bi_wkv_cuda(r, k, v, w, u)
    return bi_wkv_chunked(r, k, v, w, u)
