"""Slow, obviously-correct evaluations of Bi-WKV (SPEC section 4), for tests and benchmarks.

``bi_wkv_float64`` evaluates the formula directly in float64 (O(T^2) memory per head).
``bi_wkv_scan`` is the per-token recurrence that the reference RWKV-CLIP kernel runs twice
(once forwards, once backwards): the naive baseline of the CPU benchmark.
All take r, k, v, w [B, T, H, N] (w = raw decay, per-step decay exp(-exp(w))) and u [H, N].
"""
from __future__ import annotations

import torch


def bi_wkv_float64(r, k, v, w, u) -> torch.Tensor:
    """Direct float64 evaluation of y[t,c] = sum_j r[t,j] (u k v + forward sum + backward sum)."""
    r, k, v, w = (x.detach().to(torch.float64) for x in (r, k, v, w))
    u = u.detach().to(torch.float64)
    batch, tokens, heads, size = r.shape
    log_decay = -torch.exp(w)  # [B, T, H, N]
    cum = torch.cumsum(log_decay, dim=1)
    zero = torch.zeros_like(cum[:, :1])
    cum_before = torch.cat((zero, cum[:, :-1]), dim=1)  # cum[t-1], 0 at t = 0
    t_idx = torch.arange(tokens).view(tokens, 1)
    s_idx = torch.arange(tokens).view(1, tokens)
    # exponent[t, s] = sum of log decays strictly between s and t (both directions).
    past = cum_before[:, :, None] - cum[:, None, :]  # t > s: cum[t-1] - cum[s]
    future = cum_before[:, None, :] - cum[:, :, None]  # s > t: cum[s-1] - cum[t]
    exponent = torch.where((t_idx > s_idx)[None, :, :, None, None], past, future)
    weight = torch.exp(exponent).masked_fill((t_idx == s_idx)[None, :, :, None, None], 0.0)
    # weight: [B, T(t), T(s), H, N]
    scores = torch.einsum("bthj,btshj,bshj->bhts", r, weight, k)
    diagonal = torch.einsum("bthj,hj,bthj->bht", r, u, k)
    scores = scores + torch.diag_embed(diagonal)
    return torch.einsum("bhts,bshc->bthc", scores, v)


def bi_wkv_scan(r, k, v, w, u) -> torch.Tensor:
    """The per-token two-scan recurrence (state S <- diag(w_t) S + k_t v_t^T), in fp32, differentiable.

    Slow on purpose: it is the naive baseline that the fast paths are measured against.
    """
    dtype = r.dtype
    r, k, v, w = (x.float() for x in (r, k, v, w))
    batch, tokens, heads, size = r.shape
    decay = torch.exp(-torch.exp(w))
    diagonal = (r * u.float() * k).sum(-1, keepdim=True) * v
    outputs = [diagonal[:, t] for t in range(tokens)]
    for order in (range(tokens), reversed(range(tokens))):
        state = r.new_zeros(batch, heads, size, size)
        for t in order:
            outputs[t] = outputs[t] + torch.einsum("bhj,bhjc->bhc", r[:, t], state)
            state = decay[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
    return torch.stack(outputs, dim=1).to(dtype)
