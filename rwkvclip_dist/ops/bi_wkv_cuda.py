"""Fused CUDA Bi-WKV (SPEC section 4) as the ``torch.library`` op ``rwkvclip::bi_wkv``.

``bi_wkv_cuda(r, k, v, w, u)``: r, k, v, w [B, T, H, N] CUDA tensors of one dtype (float32,
bfloat16 or float16; w is the raw decay, per-step decay exp(-exp(w))), u [H, N] any float dtype.
Returns [B, T, H, N] in the input dtype; the kernels keep state and sums in fp32. Differentiable in
all five inputs; has a fake implementation, so torch.compile and activation checkpointing trace it.

The extension is built lazily, on the first ``is_available()`` or call, never at import
(rwkvclip_dist/ops/build.py). ``is_available()`` is False without a CUDA device, a toolkit or a
successful build; ``unavailable_reason()`` then says which.

Two kernel versions are compiled into the extension; ``RWKVCLIP_BI_WKV_KERNEL`` picks one per call
(read on every call, so one process can time both): ``v2`` (default; one block per (batch, head),
outputs written once in the input dtype, docs/cuda.md) or ``v1`` (one block per direction, fp32
atomics and stored states).

Numerics: log decays are clamped at ``LOG_DECAY_MIN`` (a per-step decay below exp(-60) ~ 1e-26 is
taken as exp(-60), and gets no gradient), which keeps chunk-local exponent sums accurate in fp32.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from rwkvclip_dist.ops.build import BuildConfig, ToolkitNotFound, build, import_prebuilt, library_path

__all__ = ["bi_wkv_cuda", "is_available", "unavailable_reason", "check_arguments", "shared_memory_bytes",
           "kernel_version"]

CHUNK_LEN = 16  # kChunk in csrc/bi_wkv/sweep_params.h
LOG_DECAY_MIN = -60.0  # kLogDecayMin
SUPPORTED_HEAD_SIZES = (16, 64, 80, 128)  # RWKVCLIP_FOR_EACH_HEAD_SIZE in csrc/bi_wkv/sweep_params.h
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMEM_CAP_SM80 = 163 * 1024  # kSmemCapSm80
KERNEL_VARIABLE = "RWKVCLIP_BI_WKV_KERNEL"
KERNEL_VERSIONS = ("v2", "v1")  # the first is the default


def shared_memory_bytes(head_size: int) -> int:
    """Dynamic shared memory per block of the sweeps for head size N, without building anything:
    SweepSmem<N>::kBytes of csrc/bi_wkv/sweep_params.h (tests/test_cuda_build.py compares the two)."""
    def floats(ld: int) -> int:
        return head_size * ld + 11 * CHUNK_LEN * ld + 2 * CHUNK_LEN ** 2 + 2 * head_size + CHUNK_LEN

    ld = head_size + 8 if floats(head_size + 8) * 4 <= SMEM_CAP_SM80 else head_size + 4
    return floats(ld) * 4


def kernel_version() -> str:
    """The kernel version RWKVCLIP_BI_WKV_KERNEL asks for: v2 (default) or v1."""
    version = os.environ.get(KERNEL_VARIABLE, "").strip().lower() or KERNEL_VERSIONS[0]
    if version not in KERNEL_VERSIONS:
        raise ValueError(f"{KERNEL_VARIABLE}={os.environ[KERNEL_VARIABLE]!r}: expected one of {', '.join(KERNEL_VERSIONS)}")
    return version


def _suffix() -> str:
    return "_v2" if kernel_version() == "v2" else ""


_extension: ModuleType | None = None
_reason: str | None = None


def _runtime_config() -> BuildConfig:
    """sm_80 code runs on every 8.x GPU and sm_90 on Hopper; other GPUs get their own build."""
    major, minor = torch.cuda.get_device_capability()
    return BuildConfig() if major in (8, 9) else BuildConfig(archs=(f"{major}.{minor}",))


def _load() -> ModuleType | None:
    global _extension, _reason
    if _extension is not None or _reason is not None:
        return _extension
    if not torch.cuda.is_available():
        _reason = "no CUDA device is visible to torch"
        return None
    config = _runtime_config()
    try:
        prebuilt = library_path(config)  # named after the sources: reading them can fail too
        _extension = import_prebuilt(prebuilt) if prebuilt.exists() else build(config)[0]
    except ToolkitNotFound as err:
        _reason = f"no CUDA toolkit to build the extension: {err}"
    except (RuntimeError, ImportError, OSError) as err:
        _reason = f"the extension did not build or load: {err}"
    return _extension


def is_available() -> bool:
    """Builds or loads the extension on first call; True when the kernels can run here."""
    return _load() is not None


def unavailable_reason() -> str:
    """Why ``is_available()`` is False ('' when it is True)."""
    _load()
    return _reason or ""


def _kernels() -> ModuleType:
    module = _load()
    if module is None:
        raise RuntimeError(f"rwkvclip::bi_wkv: the CUDA extension is unavailable: {_reason}")
    return module


@torch.library.custom_op("rwkvclip::bi_wkv", mutates_args=(), device_types="cuda")
def _bi_wkv_op(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return getattr(_kernels(), "forward" + _suffix())(r, k, v, w, u)


@_bi_wkv_op.register_fake
def _bi_wkv_fake(r, k, v, w, u):
    return torch.empty_like(r)


@torch.library.custom_op("rwkvclip::bi_wkv_backward", mutates_args=(), device_types="cuda")
def _bi_wkv_backward_op(
    grad: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(getattr(_kernels(), "backward" + _suffix())(grad, r, k, v, w, u))


@_bi_wkv_backward_op.register_fake
def _bi_wkv_backward_fake(grad, r, k, v, w, u):
    return (torch.empty_like(r), torch.empty_like(r), torch.empty_like(r), torch.empty_like(r), torch.empty_like(u))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    r, k, v, w, u = ctx.saved_tensors
    return torch.ops.rwkvclip.bi_wkv_backward(grad.contiguous(), r, k, v, w, u)


_bi_wkv_op.register_autograd(_backward, setup_context=_setup_context)


def check_arguments(r, k, v, w, u) -> None:
    """Raise ValueError/TypeError naming the argument that the kernels cannot take."""
    named = (("r", r), ("k", k), ("v", v), ("w", w), ("u", u))
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"bi_wkv_cuda: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cuda":
            raise ValueError(f"bi_wkv_cuda: {name} must be a CUDA tensor, got device {x.device}")
        if x.device != r.device:
            raise ValueError(f"bi_wkv_cuda: {name} is on {x.device} but r is on {r.device}")
        if not x.is_floating_point():
            raise TypeError(f"bi_wkv_cuda: {name} must be a floating-point tensor, got {x.dtype}")
    if r.dim() != 4:
        raise ValueError(f"bi_wkv_cuda: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    if r.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bi_wkv_cuda: r has dtype {r.dtype}; supported: float32, bfloat16, float16")
    for name, x in named[1:4]:
        if x.shape != r.shape:
            raise ValueError(f"bi_wkv_cuda: {name} has shape {tuple(x.shape)}, expected r's {tuple(r.shape)}")
        if x.dtype != r.dtype:
            raise TypeError(f"bi_wkv_cuda: {name} has dtype {x.dtype}, expected r's {r.dtype}")
    batch, tokens, heads, size = r.shape
    if tokens < 1:
        raise ValueError(f"bi_wkv_cuda: r holds T={tokens} tokens; the sequence needs T >= 1")
    if size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"bi_wkv_cuda: head size N={size} (r.shape[3]) has no compiled kernel; "
                         f"supported: {SUPPORTED_HEAD_SIZES}")
    if tuple(u.shape) != (heads, size):
        raise ValueError(f"bi_wkv_cuda: u has shape {tuple(u.shape)}, expected [H, N] = [{heads}, {size}]")


def bi_wkv_cuda(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bi-WKV on the fused CUDA kernels; see the module docstring for shapes and dtypes."""
    check_arguments(r, k, v, w, u)
    r, k, v, w = (x.contiguous() for x in (r, k, v, w))
    return torch.ops.rwkvclip.bi_wkv(r, k, v, w, u.to(torch.float32).contiguous())
