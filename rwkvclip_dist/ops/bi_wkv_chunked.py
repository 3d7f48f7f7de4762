"""Exact chunked Bi-WKV in plain PyTorch: the CPU path, and the fallback for CUDA without the kernel.

Bi-WKV = the diagonal bonus term + a strictly-past RWKV-6 scan + the same scan on the reversed
sequence (reversal maps "strictly future" onto "strictly past"), so both directions run as one
batched call of ``_strictly_past``.

Within a chunk of ``chunk`` tokens the pairwise decays exp(sum of log-decays strictly between s and
t) are built, for the causal pairs only, as a 0/1 matrix product that adds exactly those log
decays, never as a difference of two prefix sums: every exponent is <= 0 and no cancellation
occurs, which keeps strong decays (w up to +5) and long sequences exact. Between chunks an fp32 N x N state per head carries the past; both
factors around a chunk boundary have exponents <= 0 as well.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 8


def bi_wkv_chunked(r, k, v, w, u, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Bi-WKV for r, k, v, w [B, T, H, N] (w = raw decay) and u [H, N]; fp32 inside (fp64 for fp64
    inputs), returns the input dtype. Differentiable in all five inputs through autograd."""
    dtype = r.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    batch, tokens, heads, size = r.shape
    r, k, v, w = (x.to(compute) for x in (r, k, v, w))
    u = u.to(compute)

    def heads_first(x):  # [B, T, H, N] -> [B*H, T, N]
        return x.permute(0, 2, 1, 3).reshape(batch * heads, tokens, size)

    rh, kh, vh = heads_first(r), heads_first(k), heads_first(v)
    log_decay = heads_first(-torch.exp(w))
    both = [torch.cat((x, x.flip(1)), dim=0) for x in (rh, kh, vh, log_decay)]
    scanned = _strictly_past(*both, chunk=chunk)
    forward, backward = scanned[: batch * heads], scanned[batch * heads :].flip(1)
    bonus = (rh * kh * u.repeat(batch, 1)[:, None, :]).sum(-1, keepdim=True) * vh
    y = (forward + backward + bonus).reshape(batch, heads, tokens, size).permute(0, 2, 1, 3)
    return y.to(dtype)


def _strictly_past(r, k, v, log_decay, chunk: int) -> torch.Tensor:
    """o[t] = sum_{s<t} (r[t] * exp(sum_{s<p<t} log_decay[p])) . k[s] * v[s]; inputs [G, T, N]."""
    groups, tokens, size = r.shape
    pad = (-tokens) % chunk
    if pad:  # padding at the end never reaches earlier tokens of a strictly-past scan
        r, k, v, log_decay = (F.pad(x, (0, 0, 0, pad)) for x in (r, k, v, log_decay))
    n_chunks = (tokens + pad) // chunk
    r, k, v, ld = (x.reshape(groups, n_chunks, chunk, size) for x in (r, k, v, log_decay))

    # Decay from the chunk start to t-1 (exclusive prefix) and from s+1 to the chunk end (exclusive suffix).
    prefix = F.pad(ld[:, :, :-1], (0, 0, 1, 0)).cumsum(2)
    suffix = F.pad(ld.flip(2)[:, :, :-1], (0, 0, 1, 0)).cumsum(2).flip(2)
    chunk_total = ld.sum(2)  # [G, n, N]

    # Intra-chunk, over the chunk*(chunk-1)/2 causal pairs (m < i) only: between[pair] = sum_{m<p<i} ld[p]
    # is a 0/1 matrix product over p, an exact sum of the log decays strictly between the two tokens.
    select_i, select_m, spans = _causal_pairs(chunk, r.device, ld.dtype)
    between = spans @ ld  # [G, n, pairs, N], every entry <= 0
    # Gathers and the scatter back are 0/1 matrix products: their backward is a matmul, not an index_put.
    pair_scores = ((select_i @ r) * (select_m @ k) * torch.exp(between)).sum(-1)  # [G, n, pairs]
    scores = torch.einsum("gnq,qi,qm->gnim", pair_scores, select_i, select_m)
    intra = scores @ v

    # Inter-chunk: the fp32 state before each chunk, swept sequentially over chunks.
    contributions = torch.einsum("gnmj,gnmc->gnjc", k * torch.exp(suffix), v)
    before = _StateSweep.apply(torch.exp(chunk_total), contributions)  # [G, n, N, N]
    inter = (r * torch.exp(prefix)) @ before
    out = (intra + inter).reshape(groups, n_chunks * chunk, size)
    return out[:, :tokens]


def _causal_pairs(chunk: int, device, dtype):
    """One-hot selectors of the pairs m < i of a chunk ([pairs, chunk] each, for i and for m), and
    spans[pair, p] = 1 where m < p < i."""
    pair_i, pair_m = torch.tril_indices(chunk, chunk, offset=-1, device=device)
    p = torch.arange(chunk, device=device)
    select_i = (p[None, :] == pair_i[:, None]).to(dtype)
    select_m = (p[None, :] == pair_m[:, None]).to(dtype)
    spans = ((p[None, :] > pair_m[:, None]) & (p[None, :] < pair_i[:, None])).to(dtype)
    return select_i, select_m, spans


class _StateSweep(torch.autograd.Function):
    """states[n] = carry[n-1] * states[n-1] + contributions[n-1], states[0] = 0 (the state before chunk n).

    A hand-written backward: autograd through the Python loop would record several ops per chunk,
    and the reverse sweep needs only one multiply-add per chunk.
    """

    @staticmethod
    def forward(ctx, carry: torch.Tensor, contributions: torch.Tensor) -> torch.Tensor:
        # carry [G, n, N] (decay over a whole chunk per key channel), contributions [G, n, N, N]
        states = torch.empty_like(contributions)
        state = torch.zeros_like(contributions[:, 0])
        for n in range(contributions.shape[1]):
            states[:, n] = state
            state = torch.addcmul(contributions[:, n], carry[:, n, :, None], state)
        ctx.save_for_backward(carry, states)
        return states

    @staticmethod
    def backward(ctx, grad_states: torch.Tensor):
        carry, states = ctx.saved_tensors
        # grad_after[n] = dL/d(state after chunk n) = dL/d states[n+1]; the last chunk's state is unused.
        grad_after = torch.empty_like(grad_states)
        running = torch.zeros_like(grad_states[:, 0])
        for n in range(grad_states.shape[1] - 1, -1, -1):
            grad_after[:, n] = running
            running = torch.addcmul(grad_states[:, n], carry[:, n, :, None], running)
        grad_carry = (grad_after * states).sum(-1)
        return grad_carry, grad_after
