"""Fused Bi-WKV (SPEC section 4) in Triton, forward and backward, as the op ``rwkvclip::bi_wkv_triton``.

``bi_wkv_triton(r, k, v, w, u)``: r, k, v, w [B, T, H, N] of one dtype (float32, bfloat16 or
float16; w is the raw decay, per-step decay exp(-exp(w))), u [H, N]; N from 16 to 128, any T >= 1.
Returns [B, T, H, N] in the input dtype; state and sums are fp32. Differentiable in all five inputs,
with a fake implementation, so torch.compile and activation checkpointing trace it.

It runs on GPUs (NVIDIA, and AMD under ROCm) and, under Triton's interpreter (``TRITON_INTERPRET=1``),
on CPU tensors: CI executes the very kernels a GPU runs. Triton reads the variable when it is
imported (its own library functions are compiled or interpreted from then on), so it must be set
before the process starts; ``unavailable_reason`` says so when it was set later.

Form (the chunked linear-attention form of flash-linear-attention's RWKV-6 kernels, with exact
exponents): one program per (batch * head, direction, key block, value block) sweeps chunks of
``CHUNK`` tokens in its scan order; the backward direction reads the tokens in reverse, which maps
"strictly future" onto "strictly past". Within a chunk the pairwise decay exponent sum_{s<p<t} ld[p]
is summed token by token starting next to s, never formed as a difference of two prefix sums, so
every exponent is <= 0 and none cancels; across chunks an fp32 [key block, value block] state
carries the past, scaled by factors whose exponents are <= 0 too. Key blocks write partial outputs
(and value blocks partial key gradients) that are summed here, as are the two directions; the
diagonal bonus term is element-wise PyTorch around the kernels. d(w) is summed in the kernel over
the pairs each decay lies between, in sets whose terms all carry that decay: the shortcut of a
suffix sum of r.dr - k.dk cancels, and multiplied by |log decay| up to ~150 it misses 1e-5.
"""
from __future__ import annotations

import os

import torch

__all__ = ["bi_wkv_triton", "is_available", "unavailable_reason", "interpreted", "CHUNK"]

CHUNK = 16  # tokens per chunk: tl.dot needs every dimension >= 16
MAX_BLOCK = 32  # key/value channels per program: bounds the [CHUNK, CHUNK, block] intra-chunk tensor
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_SIZES = (16, 128)  # inclusive range

_mode: list[bool] = []  # whether the interpreter was on when the kernels were jitted (first launch)


def interpreted() -> bool:
    """True when Triton's interpreter runs the kernels (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason(device: torch.device | None = None) -> str:
    """Why the kernels cannot run on `device` ('' when they can)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed: {err}"
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type == "cpu" and not interpreted():
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
    if _mode and _mode[0] != interpreted():
        return "TRITON_INTERPRET changed after the kernels were first launched in this process"
    if interpreted() and not _library_interpreted():
        return "TRITON_INTERPRET=1 was set after triton was imported; set it before the process starts"
    if device.type == "cuda" and interpreted():
        return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton backend for {device.type} tensors"
    return ""


def _library_interpreted() -> bool:
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


def is_available(device: torch.device | None = None) -> bool:
    return not unavailable_reason(device)


def _jitted():
    from rwkvclip_dist.ops import bi_wkv_triton_kernels as source

    if not _mode:
        _mode.append(interpreted())
    return source.forward_kernel, source.backward_kernel


def _precision() -> str:
    """tl.dot's fp32 mode: three TF32 products (fp32 accuracy on the tensor cores) on NVIDIA GPUs;
    plain fp32 under the interpreter and on AMD GPUs, whose Triton has no tf32x3."""
    return "ieee" if interpreted() or torch.version.hip else "tf32x3"


def _blocks(size: int) -> tuple[int, int]:
    block = min(MAX_BLOCK, max(16, 1 << (size - 1).bit_length()))
    return block, -(-size // block)


def _scan_forward(r, k, v, w):
    """Both strictly-past scans: [2 directions, B, T, H, N] fp32 (summed over key blocks)."""
    batch, tokens, heads, size = r.shape
    block, n_blocks = _blocks(size)
    partial = r.new_empty((2 * n_blocks, batch, tokens, heads, size), dtype=torch.float32)  # all written
    forward, _ = _jitted()
    forward[(n_blocks * n_blocks, 2, batch * heads)](
        r, k, v, w, partial, batch, tokens, heads, size, CHUNK, block, block, n_blocks, _precision())
    return partial.view(2, n_blocks, batch, tokens, heads, size).sum(1)


def _scan_backward(r, k, v, w, grad):
    """The scan terms' d r, d k, d v and d(log decay), each [B, T, H, N] fp32, both directions summed."""
    batch, tokens, heads, size = r.shape
    block, n_blocks = _blocks(size)
    parts = [r.new_empty((2 * n_blocks, batch, tokens, heads, size), dtype=torch.float32) for _ in range(4)]
    programs, chunks = n_blocks * n_blocks * 2 * batch * heads, -(-tokens // CHUNK)
    states = r.new_empty((programs, chunks, block, block), dtype=torch.float32)
    _, backward = _jitted()
    d_r, d_k, d_v, d_ld = parts
    backward[(n_blocks * n_blocks, 2, batch * heads)](
        r, k, v, w, grad, states, d_r, d_k, d_v, d_ld, batch, tokens, heads, size, CHUNK, block, block, n_blocks,
        _precision())
    return [p.sum(0) for p in parts]


@torch.library.custom_op("rwkvclip::bi_wkv_triton", mutates_args=())
def _bi_wkv_op(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if r.numel() == 0:
        return torch.empty_like(r)
    scans = _scan_forward(r, k, v, w)
    rf, kf, vf = r.float(), k.float(), v.float()
    bonus = (rf * kf * u.float()).sum(-1, keepdim=True) * vf
    return (scans[0] + scans[1] + bonus).to(r.dtype)


@_bi_wkv_op.register_fake
def _bi_wkv_fake(r, k, v, w, u):
    return torch.empty_like(r)


@torch.library.custom_op("rwkvclip::bi_wkv_triton_backward", mutates_args=())
def _bi_wkv_backward_op(
    grad: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if r.numel() == 0:
        return (torch.zeros_like(r), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(w),
                torch.zeros_like(u))
    d_r, d_k, d_v, d_ld = _scan_backward(r, k, v, w, grad)
    rf, kf, vf, gf, uf = r.float(), k.float(), v.float(), grad.float(), u.float()
    d_w = d_ld * -torch.exp(w.float())
    g = (gf * vf).sum(-1, keepdim=True)  # [B, T, H, 1]: the bonus term's do . v
    d_r = d_r + uf * kf * g
    d_k = d_k + uf * rf * g
    d_v = d_v + (rf * kf * uf).sum(-1, keepdim=True) * gf
    d_u = (rf * kf * g).sum((0, 1))
    return d_r.to(r.dtype), d_k.to(k.dtype), d_v.to(v.dtype), d_w.to(w.dtype), d_u.to(u.dtype)


@_bi_wkv_backward_op.register_fake
def _bi_wkv_backward_fake(grad, r, k, v, w, u):
    return tuple(torch.empty_like(x) for x in (r, k, v, w, u))


# The backward recomputes everything from the five inputs: they are all it saves.
_bi_wkv_op.register_autograd(
    lambda ctx, grad: torch.ops.rwkvclip.bi_wkv_triton_backward(grad.contiguous(), *ctx.saved_tensors),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def check_arguments(r, k, v, w, u) -> None:
    """Raise ValueError/TypeError naming the argument the kernels cannot take."""
    if r.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bi_wkv_triton: r has dtype {r.dtype}; supported: float32, bfloat16, float16")
    for name, x in (("k", k), ("v", v), ("w", w)):
        if x.shape != r.shape or x.dtype != r.dtype:
            raise ValueError(f"bi_wkv_triton: {name} is {x.dtype} {tuple(x.shape)}, expected r's "
                             f"{r.dtype} {tuple(r.shape)}")
    size = r.shape[-1]
    if not HEAD_SIZES[0] <= size <= HEAD_SIZES[1]:
        raise ValueError(f"bi_wkv_triton: head size N={size} is outside {HEAD_SIZES[0]}..{HEAD_SIZES[1]}")
    if tuple(u.shape) != tuple(r.shape[2:]):
        raise ValueError(f"bi_wkv_triton: u has shape {tuple(u.shape)}, expected [H, N] = {tuple(r.shape[2:])}")


def bi_wkv_triton(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bi-WKV on the Triton kernels; see the module docstring for shapes and dtypes."""
    check_arguments(r, k, v, w, u)
    r, k, v, w, u = (x.contiguous() for x in (r, k, v, w, u))
    return torch.ops.rwkvclip.bi_wkv_triton(r, k, v, w, u)
