// Bi-WKV (SPEC section 4) as chunked causal sweeps. See docs/cuda.md for the decomposition.
//
// v1 (sweep_kernel): one thread block owns one (batch, head) and one direction: blockIdx.x =
// 2 * (b * H + h) + dir, dir 0 forward in time, 1 backward in time (the two directions of a head are
// neighbours in launch order, so the second one's reads of the same inputs tend to hit L2). v2
// (sweep_fused.cuh) runs the same sweep_pass for both directions in one block. A sweep walks the sequence in
// chunks of kChunk tokens, carrying an N x N fp32 state in shared memory. Chunks lie on the same
// time grid in both directions (the reverse sweep meets the ragged chunk first), so states stored
// by one direction line up with the other's.
//
// Generic sweep, positions in sweep order, M_t = sum_{s<t} prod_{s<p<t} w_p a_s b_s^T:
//   column output y_t = p_t M_t   (forward output y; dv in the backward)
//   row output    x_t = M_t q_t   (dr; dk in the backward)
// Inside a chunk every decay factor is exp(sum of log decays strictly between two positions of
// that chunk) or a Horner product of decays: every exponent is <= 0.
//
// The products with the N x N state (outputs from earlier chunks, carrying the state), the
// chunk's [16 x 16] dot products and the in-chunk scores between its two halves (decays factored
// through the middle position, so no exponent is positive) run on the tensor cores (tile_mma.cuh:
// TF32, split into three products for fp32 inputs). The scores inside each half (every pair with
// its own decay), the Horner sums and d(w) stay on the CUDA cores in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "chunk_load.cuh"
#include "fused_outputs.cuh"
#include "sweep_params.h"
#include "tile_mma.cuh"

namespace rwkvclip {

// kKey only, thread j < N: d(w_raw) of this sweep's term at every position of the chunk, and the
// bonus gradient. d(log w_p) sums the pairs (query tau, key sigma) with tau < p < sigma, split by
// where tau and sigma lie (before / inside / after the chunk); no long sums are cancelled.
// Expects s.pl = [tau][j] products of this chunk with the keys after it (key_products) and
// s.outer[j] = the pairs with tau before and sigma after the chunk.
// Per-position partial sums live in tiles whose contents the chunk no longer needs (col, q), not
// in registers: register arrays here cost the key sweep its occupancy.
template <int N>
__device__ void key_decay_gradient(const SweepParams& prm, const Tiles<N>& s, const Position& pos, int j,
                                   float& du_acc) {
  constexpr int L = kChunk;
  constexpr int LD = Tiles<N>::LD;
  const float* q_out = s.pl;     // [tau][j]: tau inside the chunk, sigma after it
  float* pair_sums = s.col;      // [n][j]: pairs (tau, n), tau inside the chunk before the position
  float* keys_in_suffix = s.q;   // [i][j]: sigma inside the chunk after i, tau before the chunk
  const float both_out = s.outer[j];  // tau before the chunk, sigma after it
  float run = 0.f;
  for (int n = L - 1; n >= 0; --n) {
    keys_in_suffix[n * LD + j] = run;
    run += s.p[n * LD + j] * s.inter[n * LD + j];
    pair_sums[n * LD + j] = 0.f;
  }
  float keys_out_prefix = 0.f;  // tau inside the chunk before the position, sigma after the chunk
  for (int i = 0; i < L; ++i) {
    float inside = 0.f;
    for (int n = i + 1; n < L; ++n) inside += pair_sums[n * LD + j];
    if (pos.time_of(i) < pos.T) {
      const float lw = s.lw[i * LD + j];
      const float dlw_dw = lw > kLogDecayMin ? lw : 0.f;  // d(log w)/d(w_raw) = log w; 0 where clamped
      const float dlw = keys_in_suffix[i * LD + j] + inside + keys_out_prefix + both_out;
      atomicAdd(prm.dw_out + pos.offset(i, j), dlw * dlw_dw);
    }
    keys_out_prefix += s.al[i * LD + j] * q_out[i * LD + j];
    const float ai = s.a[i * LD + j];
    float between = 1.f;  // prod of the decays strictly between i and n, built up: no exp
    for (int n = i + 1; n < L; ++n) {
      if (n > i + 1) between *= s.w[(n - 1) * LD + j];
      pair_sums[n * LD + j] += ai * s.p[n * LD + j] * between * s.dots[n * L + i];
    }
    if (pos.dir == 0) du_acc += ai * s.p[i * LD + j] * s.dots[i * L + i];
  }
}

// kKey only, after the chunk's outputs and with the state already decayed to the chunk end
// (M' = diag(exp(cb_last)) M): the two inputs of key_decay_gradient that involve the opposite
// query sweep's state K entering this chunk (keys after it, in this sweep's order).
//   s.pl[tau][j] = sum_c b[tau][c] K[j][c]   (tensor cores; pl is no longer needed)
//   s.outer[j]   = sum_c M'[j][c] K[j][c]
template <int N>
__device__ void key_products(const SweepParams& prm, const Tiles<N>& s, const Position& pos, int tid, bool split) {
  constexpr int LD = Tiles<N>::LD;
  const float* K = prm.states_in + ((int64_t(1 - pos.dir) * prm.BH + pos.bh) * pos.chunks + pos.chunk) * N * N;
  for (int tile = tid / 32; tile < N / 16; tile += kThreads / 32) {
    const int j0 = tile * 16;
    AccTile acc;
    wmma::fill_fragment(acc, 0.f);
    mma_accumulate<N, wmma::row_major, wmma::col_major, Space::kGlobal>(acc, s.b, LD, K + j0 * N, N, split);
    store_shared(s.pl + j0, acc, LD);
  }
  if (tid < N) {
    float sum = 0.f;
    for (int c = 0; c < N; ++c) sum += s.M[tid * LD + c] * __ldg(K + tid * N + c);
    s.outer[tid] = sum;
  }
}

// One sweep over the sequence in direction `dir`. v1 (kFused false): the body of sweep_kernel, one
// block per (batch, head, direction); outputs added by atomics onto zeroed fp32 buffers (two
// fp32 additions onto zero commute exactly, so the two directions' atomicAdds are deterministic).
// v2 (kFused true, sweep_fused.cuh): one of the sweeps a block runs in a row for its (batch, head),
// `stage` saying which (fused_outputs.cuh): outputs written in the input dtype by the first sweep
// that produces them and read-modified-written by the second, d(w) from the row outputs.
template <int N, Sweep KIND, bool kFused, int kType = kAnyType>
__device__ __forceinline__ void sweep_pass(const SweepParams& prm, const Tiles<N>& s, int dir, int stage,
                                           float& du_acc, float& carry) {
  constexpr int L = kChunk;
  constexpr int LD = Tiles<N>::LD;
  constexpr int kWarps = kThreads / 32;
  constexpr int kTilesPerRow = N / 16;  // 16-wide tensor-core tiles across N
  constexpr bool kCol = KIND != Sweep::kQuery;
  constexpr bool kRow = KIND != Sweep::kForward;
  // in-chunk scores: the chunk splits into two halves; pairs inside a half are summed directly,
  // pairs across the halves go through the reference position kMid (the last of the first half)
  constexpr int kHalf = L / 2;
  constexpr int kMid = kHalf - 1;
  constexpr int kPairsPerHalf = kHalf * (kHalf - 1) / 2;
  constexpr int kLanesPerPair = 4;
  constexpr int kHalfPairWarps = 2 * kPairsPerHalf * kLanesPerPair / 32;
  static_assert(2 * kPairsPerHalf * kLanesPerPair == 32 * kHalfPairWarps && kHalfPairWarps < kWarps,
                "the in-half pairs fill whole warps and leave the last warp for the dot products");

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  // fp32 inputs need the three-product TF32 split to stay at fp32 accuracy; bf16/fp16 do not
  // (v2's backward splits for every dtype: its d(w) subtracts long sums of the row outputs, which
  // magnifies their error; one TF32 product each gives 2e-2 in bf16 at T=197, the split 2e-3)
  const bool split = kType == kAnyType ? prm.type == InputType::kFloat
                                       : kType == int(InputType::kFloat) || (kFused && KIND != Sweep::kForward);
  Position pos;
  pos.bh = kFused ? int(blockIdx.x) : int(blockIdx.x / 2);
  pos.dir = dir;
  pos.T = prm.T;
  pos.chunks = (prm.T + L - 1) / L;
  const int h = pos.bh % prm.H;
  pos.head_base = (int64_t(pos.bh / prm.H) * prm.T * prm.H + h) * N;
  pos.t_stride = int64_t(prm.H) * N;
  const float* u = prm.u + h * N;

  // v2's query sweeps also read p = r: their row outputs times r give d(w) (fused_outputs.cuh)
  constexpr bool kLoadP = kCol || (kFused && KIND == Sweep::kQuery);
  constexpr int kSources = 3 + int(kLoadP) + int(kRow);  // a, b, [p], [q], w
  const void* sources[kSources];
  float* tiles[kSources - 1];
  {
    int t = 0;
    sources[t] = prm.a, tiles[t++] = s.a;
    sources[t] = prm.b, tiles[t++] = s.b;
    if constexpr (kLoadP) sources[t] = prm.p, tiles[t++] = s.p;
    if constexpr (kRow) sources[t] = prm.q, tiles[t++] = s.q;
    sources[t] = prm.w;
  }
  ChunkPrefetch<N, kSources, kType> prefetch;
  const auto first_chunk = [&](int step) { return pos.dir == 0 ? step : pos.chunks - 1 - step; };
  with_element_type<kType>(prm.type, [&](auto tag) { prefetch.template load<decltype(tag)>(sources, pos, first_chunk(0), tid); });
  for (int idx = tid; idx < N * LD; idx += kThreads) s.M[idx] = 0.f;
  __syncthreads();

  for (int step = 0; step < pos.chunks; ++step) {
    pos.chunk = first_chunk(step);

    // -- the chunk's inputs (loaded during the previous chunk) into the tiles, then the next
    //    chunk's loads, which stay in flight during this chunk's math
    with_element_type<kType>(prm.type, [&](auto tag) {
      using T = decltype(tag);
      prefetch.template store<T, LD>(tiles, s.lw, s.w, pos, tid);
      if (step + 1 < pos.chunks) prefetch.template load<T>(sources, pos, first_chunk(step + 1), tid);
    });
    if constexpr (kCol) {  // the score tile is filled piecewise below; what no piece covers is 0
      for (int idx = tid; idx < L * L; idx += kThreads) s.att[idx] = 0.f;
    }
    if constexpr (KIND == Sweep::kQuery && !kFused) {  // what the opposite key sweep needs for d(w)
      float* dst = prm.states_out + ((int64_t(pos.dir) * prm.BH + pos.bh) * pos.chunks + pos.chunk) * N * N;
      for (int idx = tid; idx < N * N; idx += kThreads) store_global(dst + idx, s.M[(idx / N) * LD + idx % N]);
    }
    __syncthreads();
    if (tid < N) {
      float run = 0.f;
#pragma unroll
      for (int i = 0; i < L; ++i) {
        run += s.lw[i * LD + tid];
        s.cb[i * LD + tid] = run;
      }
      s.decay[tid] = expf(run);
      if constexpr (kFused) s.outer[tid] = carry;  // the d(w) running sum entering the chunk
    }
    __syncthreads();

    // -- decayed tiles, the scores inside each half of the chunk (CUDA cores: each term has its
    //    own decay) and the dot products q_i . b_m (tensor cores, the last warp)
    if (kRow && warp == kWarps - 1) {
      AccTile acc;
      wmma::fill_fragment(acc, 0.f);
      mma_accumulate<N, wmma::row_major, wmma::col_major>(acc, s.q, LD, s.b, LD, split);
      store_shared(s.dots, acc, L);
    }
#pragma unroll 1  // one element at a time: unrolled, these loops pushed v2 at N=64 over 80 registers
    for (int idx = tid; idx < L * N; idx += kThreads) {
      const int i = idx / N, j = idx % N;
      const int o = i * LD + j;
      s.al[o] = s.a[o] * expf(s.cb[(L - 1) * LD + j] - s.cb[o]);
      if constexpr (kCol) {
        s.pl[o] = s.p[o] * (i > 0 ? expf(s.cb[o - LD]) : 1.f);
        // for the scores between the halves: queries of the second half and keys of the first,
        // both decayed to the reference kMid (every exponent <= 0); the other rows are 0
        s.col[o] = i > kMid ? s.p[o] * expf(s.cb[o - LD] - s.cb[kMid * LD + j]) : 0.f;
        s.inter[o] = i <= kMid ? s.a[o] * expf(s.cb[kMid * LD + j] - s.cb[o]) : 0.f;
      }
    }
    if (kCol && warp < kHalfPairWarps) {
      // scores att[i][m], m < i, inside one half: exponent = log decays strictly between m and i.
      // Four adjacent lanes share a pair and a quarter of the channels each, then add up by
      // shuffles (a fixed order: deterministic).
      const int pair = tid / kLanesPerPair, part = tid % kLanesPerPair;
      int i = 1, m = pair % kPairsPerHalf;
      while (m >= i) m -= i++;
      const int first = (pair / kPairsPerHalf) * kHalf;
      i += first;
      m += first;
      float acc = 0.f;
#pragma unroll 4
      for (int j = part; j < N; j += kLanesPerPair)
        acc += s.p[i * LD + j] * s.a[m * LD + j] * expf(s.cb[(i - 1) * LD + j] - s.cb[m * LD + j]);
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      acc += __shfl_xor_sync(0xffffffffu, acc, 2);
      if (part == 0) s.att[i * L + m] = acc;
    }
    if (kCol && pos.dir == 0 && tid < L) {
      float acc = 0.f;
#pragma unroll 4  // fully unrolled, the N loads of u in flight at once took 64 registers
      for (int j = 0; j < N; ++j) acc += s.a[tid * LD + j] * __ldg(u + j) * s.p[tid * LD + j];
      s.beta[tid] = acc;
    }
    __syncthreads();

    // -- scores between the halves (i > kMid >= m) as one tensor-core product, added onto the
    //    tile: rows <= kMid of the queries and rows > kMid of the keys are 0, so the product is 0
    //    wherever the in-half scores are
    if (kCol && warp == 0) {
      AccTile acc;
      load_shared(acc, s.att, L);
      mma_accumulate<N, wmma::row_major, wmma::col_major>(acc, s.col, LD, s.inter, LD, split);
      store_shared(s.att, acc, L);
    }
    __syncthreads();

    // -- products with the state entering the chunk, on the tensor cores, one 16-wide tile per warp:
    //    column tiles p~ M + att b (-> col), row tiles q M^T (-> inter)
    {
      constexpr int kColTiles = kCol ? kTilesPerRow : 0;
      constexpr int kRowTiles = kRow ? kTilesPerRow : 0;
      for (int tile = warp; tile < kColTiles + kRowTiles; tile += kWarps) {
        AccTile acc;
        wmma::fill_fragment(acc, 0.f);
        if (tile < kColTiles) {
          const int c0 = tile * 16;
          mma_accumulate<N, wmma::row_major, wmma::row_major>(acc, s.pl, LD, s.M + c0, LD, split);
          mma_accumulate<L, wmma::row_major, wmma::row_major>(acc, s.att, L, s.b + c0, LD, split);
          store_shared(s.col + c0, acc, LD);
        } else {
          const int j0 = (tile - kColTiles) * 16;  // B[c][j] = M[j][c]: M read column-major
          mma_accumulate<N, wmma::row_major, wmma::col_major>(acc, s.q, LD, s.M + j0 * LD, LD, split);
          store_shared(s.inter + j0, acc, LD);
        }
      }
    }
    __syncthreads();

    // -- outputs of this chunk: column (y or dv) and row (dr or dk), bonus in direction 0; the
    //    state is consumed, so decay it to the chunk end in the same pass
#pragma unroll 1  // one element at a time: unrolled, these loops pushed v2 at N=64 over 80 registers
    for (int idx = tid; idx < L * N; idx += kThreads) {
      const int i = idx / N, col = idx % N;
      const bool ok = pos.time_of(i) < pos.T;
      if constexpr (kCol) {
        float y = s.col[i * LD + col];
        if (pos.dir == 0) y += s.beta[i] * s.b[i * LD + col];
        if constexpr (kFused) {
          if (ok) emit<kType>(prm.col_typed, prm.type, pos.offset(i, col), y, stage % 2 == 0);
        } else if (ok) {
          atomicAdd(prm.col_out + pos.offset(i, col), y);
        }
      }
      if constexpr (kRow) {
        const int j = col;
        const float inter = s.inter[i * LD + j] * (i > 0 ? expf(s.cb[(i - 1) * LD + j]) : 1.f);
        float acc = 0.f;  // Horner over m < i: sum_m a_m dots[i,m] prod_{m<p<i} w_p, no exp at all
        for (int m = 0; m < i; ++m) acc = acc * s.w[m * LD + j] + s.a[m * LD + j] * s.dots[i * L + m];
        float x = acc + inter;
        // v2: this sweep's share of d(log w), p times the row output without the bonus
        s.inter[i * LD + j] = kFused ? s.p[i * LD + j] * x : inter;
        if (pos.dir == 0) x += __ldg(u + j) * s.a[i * LD + j] * s.dots[i * L + i];
        if constexpr (kFused) {
          if (ok) emit<kType>(prm.row_typed, prm.type, pos.offset(i, j), x, stage % 2 == 0);
        } else if (ok) {
          atomicAdd(prm.row_out + pos.offset(i, j), x);
        }
      }
    }
    for (int idx = tid; idx < N * N; idx += kThreads) {
      const int j = idx / N, c = idx % N;
      s.M[j * LD + c] *= s.decay[j];
    }
    __syncthreads();

    if constexpr (kFused && kRow) {
      decay_gradient_running_sums<N, kType>(prm, s, pos, tid, stage, carry);
      if (KIND == Sweep::kKey && pos.dir == 0 && tid < N)
        for (int i = 0; i < L; ++i) du_acc += s.a[i * LD + tid] * s.p[i * LD + tid] * s.dots[i * L + i];
      // no barrier: the state carry below writes only M, which these read not
    } else if constexpr (KIND == Sweep::kKey) {
      key_products<N>(prm, s, pos, tid, split);
      __syncthreads();
      if (tid < N) key_decay_gradient<N>(prm, s, pos, tid, du_acc);
      // no barrier: the state update below reads neither what key_decay_gradient writes (col, q,
      // dw_out) nor anything it reads that the update writes (M)
    }

    // -- carry the state past this chunk: M <- M + sum_m (a_m decayed to the end) b_m^T, i.e.
    //    M[j0.., c0..] += al^T b with al read column-major, one 16 x 16 tile per warp; the product is
    //    summed apart from M and added in fp32 (mma_add_to: the tensor cores' sums truncate)
    for (int tile = warp; tile < kTilesPerRow * kTilesPerRow; tile += kWarps) {
      const int j0 = (tile / kTilesPerRow) * 16, c0 = (tile % kTilesPerRow) * 16;
      mma_add_to<L, wmma::col_major, wmma::row_major>(s.M + j0 * LD + c0, LD, s.al + j0, LD, s.b + c0, LD, split);
    }
    __syncthreads();
  }
}

// v1: one block per (batch, head, direction), blockIdx.x = 2 * (b * H + h) + dir.
template <int N, Sweep KIND>
__global__ void __launch_bounds__(kThreads, 2) sweep_kernel(SweepParams prm) {
  extern __shared__ __align__(128) float smem[];
  const Tiles<N> s(smem);
  float du_acc = 0.f, carry = 0.f;  // kKey, direction 0: thread j < N owns channel j of du
  const int dir = int(blockIdx.x % 2);
  sweep_pass<N, KIND, false>(prm, s, dir, 0, du_acc, carry);
  if (KIND == Sweep::kKey && dir == 0 && threadIdx.x < N)
    store_global(prm.du_part + int64_t(blockIdx.x / 2) * N + threadIdx.x, du_acc);
}

}  // namespace rwkvclip
