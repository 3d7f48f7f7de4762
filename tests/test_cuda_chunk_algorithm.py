"""The chunk decomposition of csrc/bi_wkv/, proven on CPU in float64 against the direct formula.

This file restates the kernels' algorithm step by step in PyTorch (same chunk length and time grid,
same row/column sweeps, same Horner recurrence, same split of d(log w) by where the pair lies,
same stored states) and checks it against `bi_wkv_float64` (forward) and autograd through the
exact chunked path (gradients; `bi_wkv_float64` detaches its inputs). It proves the maths apart
from any code: tests/test_cuda_kernel_on_cpu.py then runs the kernel source itself. The float32
run previews the accuracy the kernels can reach (SPEC: 1e-5); it also showed that the usual
cumulative-sum form of d(log w) loses about 1e-4 in fp32, which is why the kernels do not use it.
"""
from __future__ import annotations

import pytest
import torch

from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked
from rwkvclip_dist.ops.bi_wkv_cuda import CHUNK_LEN, LOG_DECAY_MIN
from rwkvclip_dist.ops.bi_wkv_reference import bi_wkv_float64


def _log_decay(w: torch.Tensor) -> torch.Tensor:
    return torch.clamp(-torch.exp(w), min=LOG_DECAY_MIN)


def _sweep(a, b, lw, p=None, q=None, front_pad=False, far=None):
    """One causal sweep over [G, T, N] tensors given in sweep order, as `sweep_kernel` runs it.

    State M = sum_{s<t} prod_{s<p<t} w_p a_s b_s^T. Column output y_t = p_t M_t (the forward
    output, or dv); row output x_t = M_t q_t (dr, or dk). Chunks sit on the time grid, so the
    reverse sweep pads at its front (`front_pad`). Returns dict(x, y, states: M entering each chunk,
    dlw: gradient of the log decays for this term, when `far` (the opposite sweep's states) is given).
    """
    G, T, N = a.shape
    L = CHUNK_LEN
    pad = (-T) % L
    spec = (0, 0, pad, 0) if front_pad else (0, 0, 0, pad)
    a, b, lw, p, q = (None if z is None else torch.nn.functional.pad(z, spec) for z in (a, b, lw, p, q))
    M = a.new_zeros(G, N, N)
    xs, ys, states, dlws = [], [], [], []
    tri = torch.tril(torch.ones(L, L, dtype=torch.bool), diagonal=-1)  # m < i
    for n, c0 in enumerate(range(0, T + pad, L)):
        states.append(M)
        ac, bc, lwc = a[:, c0:c0 + L], b[:, c0:c0 + L], lw[:, c0:c0 + L]
        cb = torch.cumsum(lwc, dim=1)
        cbm1 = torch.cat([torch.zeros_like(cb[:, :1]), cb[:, :-1]], dim=1)  # decay up to i-1
        last = cb[:, -1:, :]
        if p is not None:
            pc = p[:, c0:c0 + L]
            # every exponent is a sum of log decays strictly between m and i, hence <= 0
            expo = cbm1[:, :, None, :] - cb[:, None, :, :]
            expo = torch.where(tri[None, :, :, None], expo, torch.full_like(expo, -torch.inf))
            att = torch.einsum("gij,gmj,gimj->gim", pc, ac, torch.exp(expo))
            ys.append(att @ bc + (pc * torch.exp(cbm1)) @ M)
        if q is not None:
            qc = q[:, c0:c0 + L]
            dots = (qc @ bc.transpose(1, 2)) * tri  # dots[i, m] = q_i . b_m
            wd = torch.exp(lwc)
            acc = torch.zeros_like(ac)
            for m in range(L):  # Horner over the keys before i: multiplies decays, never exponentiates
                upd = acc * wd[:, m:m + 1, :] + ac[:, m:m + 1, :] * dots[:, :, m:m + 1]
                acc = torch.where(tri[:, m][None, :, None], upd, acc)
            inter = torch.exp(cbm1) * (qc @ M.transpose(1, 2))
            xs.append(acc + inter)
        if far is not None:
            # pairs (query tau, key sigma), tau < pos < sigma, split by where tau and sigma lie
            K = far[n]
            keys_in = torch.flip(torch.cumsum(torch.flip(pc * inter, [1]), 1), [1]) - pc * inter
            expo = cbm1[:, None, :, :] - cb[:, :, None, :]  # [tau, sigma]: decays strictly between
            expo = torch.where(tri.T[None, :, :, None], expo, torch.full_like(expo, -torch.inf))
            pair = ac[:, :, None, :] * pc[:, None, :, :] * torch.exp(expo) * dots.transpose(1, 2)[..., None]
            inside = torch.stack([pair[:, :i, i + 1:].sum((1, 2)) for i in range(L)], 1)
            q_out = ac * torch.exp(last - cb) * (bc @ K.transpose(1, 2))
            keys_out = torch.cumsum(q_out, 1) - q_out
            both_out = torch.exp(last) * (M * K).sum(-1)[:, None, :]
            dlws.append(keys_in + inside + keys_out + both_out)
        M = torch.exp(last).transpose(1, 2) * M + (ac * torch.exp(last - cb)).transpose(1, 2) @ bc
    cut = (lambda z: z[:, pad:]) if front_pad else (lambda z: z[:, :T])
    out = {"states": states}
    for key, parts in (("x", xs), ("y", ys), ("dlw", dlws)):
        out[key] = cut(torch.cat(parts, 1)) if parts else None
    return out


def _heads(z):  # [B,T,H,N] -> [B*H, T, N]
    B, T, H, N = z.shape
    return z.permute(0, 2, 1, 3).reshape(B * H, T, N)


def _unheads(z, B, H):
    G, T, N = z.shape
    return z.reshape(B, H, T, N).permute(0, 2, 1, 3)


def _flip(z, flip):
    return z.flip(1) if flip else z


def emulate_forward(r, k, v, w, u):
    B, T, H, N = r.shape
    rr, kk, vv, lw = (_heads(z) for z in (r, k, v, _log_decay(w)))
    y = ((rr * kk * u.repeat(B, 1)[:, None, :]).sum(-1, keepdim=True)) * vv  # bonus (diagonal) term
    for flip in (False, True):
        f = lambda z: _flip(z, flip)  # noqa: E731
        y = y + f(_sweep(f(kk), f(vv), f(lw), p=f(rr), front_pad=flip)["y"])
    return _unheads(y, B, H)


def emulate_backward(r, k, v, w, u, dy):
    """Mirrors the two backward launches: query sweeps (dr, states), then key sweeps (dk, dv, dw)."""
    B, T, H, N = r.shape
    rr, kk, vv, dd, lw = (_heads(z) for z in (r, k, v, dy, _log_decay(w)))
    uu = u.repeat(B, 1)[:, None, :]
    dot = (dd * vv).sum(-1, keepdim=True)
    dr, dk, dlw = uu * kk * dot, uu * rr * dot, torch.zeros_like(lw)
    dv = (rr * kk * uu).sum(-1, keepdim=True) * dd
    states = []
    for flip in (False, True):
        f = lambda z: _flip(z, flip)  # noqa: E731
        out = _sweep(f(kk), f(vv), f(lw), q=f(dd), front_pad=flip)
        dr = dr + f(out["x"])
        states.append(out["states"])
    for flip in (False, True):
        f = lambda z: _flip(z, flip)  # noqa: E731
        far = states[0 if flip else 1][::-1]  # the opposite sweep, same time chunks
        out = _sweep(f(rr), f(dd), f(lw), p=f(kk), q=f(vv), front_pad=flip, far=far)
        dk, dv, dlw = dk + f(out["x"]), dv + f(out["y"]), dlw + f(out["dlw"])
    du = (rr * kk * dot).sum(1).reshape(B, H, N).sum(0)
    # d(log w)/dw_raw = log w, and 0 where the kernel clamps log w
    unclamped = -torch.exp(_heads(w)) > LOG_DECAY_MIN
    dw = dlw * torch.where(unclamped, lw, torch.zeros_like(lw))
    return tuple(_unheads(z, B, H) for z in (dr, dk, dv, dw)) + (du,)


def _inputs(B, T, H, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    # raw decays from -6 (w ~ 1) to 3 (w ~ e^-20): strong decays included
    w = torch.rand(B, T, H, N, generator=g, dtype=dtype) * 9 - 6
    u = torch.randn(H, N, generator=g, dtype=dtype)
    dy = torch.randn(B, T, H, N, generator=g, dtype=dtype)
    return r, k, v, w, u, dy


def _reference_grads(r, k, v, w, u, dy):
    """Output of the direct float64 formula; gradients by autograd through the exact chunked
    path in float64 (bi_wkv_float64 detaches its inputs; bi_wkv_chunked is gradchecked)."""
    leaves = [z.detach().double().requires_grad_() for z in (r, k, v, w, u)]
    grads = torch.autograd.grad(bi_wkv_chunked(*leaves), leaves, dy.double())
    return bi_wkv_float64(r, k, v, w, u), grads


def _rel(a, b, floor=1e-6):
    """Norm-wise relative error; `floor` (per element) keeps an all-zero reference (dw at T <= 2,
    where no token lies strictly between two others) from turning round-off into infinity."""
    scale = max(b.double().norm().item(), floor * b.numel() ** 0.5)
    return (a.double() - b.double()).norm().item() / scale


@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 33, 49])
def test_chunk_decomposition_exact_in_float64(T):
    r, k, v, w, u, dy = _inputs(2, T, 2, 8, torch.float64, seed=T)
    y_ref, grads_ref = _reference_grads(r, k, v, w, u, dy)
    assert _rel(emulate_forward(r, k, v, w, u), y_ref) < 1e-12
    for name, got, want in zip("rkvwu", emulate_backward(r, k, v, w, u, dy), grads_ref):
        assert _rel(got, want) < 1e-9, f"d{name} at T={T}"


def test_float32_chunks_meet_spec_tolerance():
    """Float32 everywhere except the combine scans (float64 in the kernel too)."""
    r, k, v, w, u, dy = _inputs(1, 197, 2, 32, torch.float64, seed=7)
    y_ref, grads_ref = _reference_grads(r, k, v, w, u, dy)
    f32 = [z.float() for z in (r, k, v, w, u, dy)]
    assert _rel(emulate_forward(*f32[:5]), y_ref) < 1e-5
    for name, got, want in zip("rkvwu", emulate_backward(*f32), grads_ref):
        assert _rel(got, want) < 1e-5, f"d{name}"
