"""The Triton kernels of rwkvclip_dist/ops/bi_wkv_triton.py, which imports this module on the first launch:
TRITON_INTERPRET is read then (by ``triton.jit``), not when rwkvclip_dist.ops is imported.

Each program owns one (batch * head, direction, key block, value block) and sweeps the chunks in its
scan order: direction 0 reads tokens 0..T-1, direction 1 reads them T-1..0, so both compute a
strictly-past scan o[t] = sum_{s<t} (r[t] * exp(sum_{s<p<t} ld[p])) . k[s] v[s], ld = -exp(w).
Tensors are contiguous [B, T, H, N]; partial outputs are [2 * blocks, B, T, H, N] fp32, slot
direction * blocks + block of the dimension summed over (key blocks for o and d v, value blocks
for d r and d k).
"""
import triton
import triton.language as tl


@triton.jit
def _chunk(r, k, v, w, base, c, direction, T, H: tl.constexpr, N: tl.constexpr,
           BT: tl.constexpr, BK: tl.constexpr, ok, ov):
    """Load chunk c (scan order) and its decay factors; every exponent below is <= 0."""
    rows = tl.arange(0, BT)
    pos = c * BT + rows
    valid = pos < T
    tok = pos + direction * (T - 1 - 2 * pos)
    step = H * N
    mk, mv = ok < N, ov < N
    at_k = base + tok[:, None] * step + ok[None, :]
    rc = tl.load(r + at_k, mask=valid[:, None] & mk[None, :], other=0.0).to(tl.float32)
    kc = tl.load(k + at_k, mask=valid[:, None] & mk[None, :], other=0.0).to(tl.float32)
    vc = tl.load(v + base + tok[:, None] * step + ov[None, :], mask=valid[:, None] & mv[None, :],
                 other=0.0).to(tl.float32)
    ld = -tl.exp(tl.load(w + at_k, mask=valid[:, None] & mk[None, :], other=float("-inf")).to(tl.float32))
    # The log decay of the previous / next token of the chunk in scan order (0 past its ends).
    prev_ok = (rows > 0) & valid
    tok_prev = tok - 1 + 2 * direction
    ld_prev = -tl.exp(tl.load(w + base + tok_prev[:, None] * step + ok[None, :],
                              mask=prev_ok[:, None] & mk[None, :], other=float("-inf")).to(tl.float32))
    next_ok = (rows < BT - 1) & (pos + 1 < T)
    tok_next = tok + 1 - 2 * direction
    ld_next = -tl.exp(tl.load(w + base + tok_next[:, None] * step + ok[None, :],
                              mask=next_ok[:, None] & mk[None, :], other=float("-inf")).to(tl.float32))
    before = tl.cumsum(ld_prev, axis=0)  # sum of ld over the chunk's tokens before t
    after = tl.cumsum(ld_next, axis=0, reverse=True)  # ... after s
    total = tl.sum(ld, axis=0)
    # between[t, s, j] = sum_{s<p<t} ld[p, j]: a running sum along t that starts at p = s+1 (zeros
    # before), so it is a sum of same-signed terms, never a difference of two prefix sums.
    later = rows[:, None] > rows[None, :] + 1
    between = tl.cumsum(tl.where(later[:, :, None], ld_prev[:, None, :], 0.0), axis=0)
    causal = rows[:, None] > rows[None, :]
    decay = tl.where(causal[:, :, None], tl.exp(between), 0.0)
    return tok, valid, rc, kc, vc, before, after, total, decay


@triton.jit
def forward_kernel(r, k, v, w, out, B, T, H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, NB: tl.constexpr,
                   PRECISION: tl.constexpr):
    i_kv, direction, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // NB, i_kv % NB
    batch, head = (i_bh // H).to(tl.int64), i_bh % H  # 64-bit offsets: tensors may pass 2^31 elements
    base = batch * T * H * N + head * N
    ok, ov = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    slot = out + (direction * NB + i_k).to(tl.int64) * B * T * H * N
    state = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(0, (T + BT - 1) // BT):
        tok, valid, rc, kc, vc, before, after, total, decay = _chunk(
            r, k, v, w, base, c, direction, T, H, N, BT, BK, ok, ov)
        scores = tl.sum(rc[:, None, :] * kc[None, :, :] * decay, axis=2)
        o = tl.dot(scores, vc, input_precision=PRECISION)
        o += tl.dot(rc * tl.exp(before), state, input_precision=PRECISION)
        tl.store(slot + base + tok[:, None] * H * N + ov[None, :], o, mask=valid[:, None] & (ov < N)[None, :])
        state = state * tl.exp(total)[:, None] + tl.dot(tl.trans(kc * tl.exp(after)), vc, input_precision=PRECISION)


@triton.jit
def _shift(x, rows, by: tl.constexpr):
    """out[p] = x[p - by] along the chunk (0 outside it): exact, a 0/1 selection."""
    pick = rows[:, None] == rows[None, :] + by
    return tl.sum(tl.where(pick[:, :, None], x[None, :, :], 0.0), axis=1)


@triton.jit
def backward_kernel(r, k, v, w, grad, states, d_r, d_k, d_v, d_ld, B, T, H: tl.constexpr, N: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NB: tl.constexpr,
                    PRECISION: tl.constexpr):
    """d r, d k, d v and d(log decay), each summed over the pairs of one (direction, key block,
    value block); ``states`` is scratch for the state before each chunk, [programs, chunks, BK, BV]."""
    i_kv, direction, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // NB, i_kv % NB
    batch, head = (i_bh // H).to(tl.int64), i_bh % H  # 64-bit offsets: tensors may pass 2^31 elements
    base = batch * T * H * N + head * N
    rows = tl.arange(0, BT)
    ok, ov = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    mk, mv = ok < N, ov < N
    size = (batch * 0 + B) * T * H * N  # in 64 bits, as batch is (B may arrive as a constant)
    slot_r = d_r + (direction * NB + i_v) * size
    slot_k = d_k + (direction * NB + i_v) * size
    slot_w = d_ld + (direction * NB + i_v) * size
    slot_v = d_v + (direction * NB + i_k) * size
    n_chunks = (T + BT - 1) // BT
    program = ((i_bh * 2 + direction) * NB * NB + i_kv).to(tl.int64)
    at_state = states + program * n_chunks * BK * BV + tl.arange(0, BK)[:, None] * BV + tl.arange(0, BV)[None, :]
    # Forwards over the chunks: keep the state before each one.
    state = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(0, n_chunks):
        tok, valid, rc, kc, vc, before, after, total, decay = _chunk(
            r, k, v, w, base, c, direction, T, H, N, BT, BK, ok, ov)
        tl.store(at_state + c * BK * BV, state)
        state = state * tl.exp(total)[:, None] + tl.dot(tl.trans(kc * tl.exp(after)), vc, input_precision=PRECISION)
    # Backwards over the chunks, with the gradient arriving from the future.
    future = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        tok, valid, rc, kc, vc, before, after, total, decay = _chunk(
            r, k, v, w, base, c, direction, T, H, N, BT, BK, ok, ov)
        state = tl.load(at_state + c * BK * BV)
        gc = tl.load(grad + base + tok[:, None] * H * N + ov[None, :], mask=valid[:, None] & mv[None, :],
                     other=0.0).to(tl.float32)
        gv = tl.dot(gc, tl.trans(vc), input_precision=PRECISION)  # [t, s]: do[t] . v[s]
        pairs = gv[:, :, None] * rc[:, None, :] * kc[None, :, :] * decay  # [t, s, j]
        dr_past = tl.exp(before) * tl.dot(gc, tl.trans(state), input_precision=PRECISION)
        dk_future = tl.exp(after) * tl.dot(vc, tl.trans(future), input_precision=PRECISION)
        dr = tl.sum(gv[:, :, None] * kc[None, :, :] * decay, axis=1) + dr_past
        dk = tl.sum(gv[:, :, None] * rc[:, None, :] * decay, axis=0) + dk_future
        scores = tl.sum(rc[:, None, :] * kc[None, :, :] * decay, axis=2)  # [t, s]
        dv = tl.dot(tl.trans(scores), gc, input_precision=PRECISION)
        dv += tl.dot(kc * tl.exp(after), future, input_precision=PRECISION)
        # d ld[p] = sum over the pairs s < p < t, in four sets, each a sum of terms that all carry
        # the decay of p (no difference of large sums): both in the chunk; s in the chunk and t
        # later; s earlier and t in the chunk; s earlier and t later (the same for every p).
        inner = tl.sum(tl.where((rows[:, None] > rows[None, :] + 1)[:, :, None], tl.cumsum(pairs, axis=1), 0.0),
                       axis=0)  # [s]: pairs (s' <= s, t > s + 1)
        dld = _shift(inner + tl.cumsum(kc * dk_future, axis=0), rows, 1)
        dld += _shift(tl.cumsum(rc * dr_past, axis=0, reverse=True), rows, -1)
        dld += (tl.exp(total) * tl.sum(state * future, axis=1))[None, :]
        at_k = base + tok[:, None] * H * N + ok[None, :]
        tl.store(slot_r + at_k, dr, mask=valid[:, None] & mk[None, :])
        tl.store(slot_k + at_k, dk, mask=valid[:, None] & mk[None, :])
        tl.store(slot_w + at_k, dld, mask=valid[:, None] & mk[None, :])
        tl.store(slot_v + base + tok[:, None] * H * N + ov[None, :], dv, mask=valid[:, None] & mv[None, :])
        future = future * tl.exp(total)[:, None] + tl.dot(tl.trans(rc * tl.exp(before)), gc,
                                                          input_precision=PRECISION)
