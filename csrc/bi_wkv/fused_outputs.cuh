// How the v2 sweeps (sweep_fused.cuh) write their outputs: once per sweep, in the input dtype, and
// d(w) from the row outputs, with no stored states.
//
// A v2 block runs every sweep of its (batch, head) in a row, so each output element is written by
// exactly two sweeps of the same block: the first stores its share, the second reads it back, adds
// its own and stores the sum (no zero-fill, atomics or cast pass; the block's barriers between the
// sweeps make the first share visible, so no block hands anything to another).
//
// d(log w_p), per channel, for the forward-in-time term (pairs key s < p < query t) is
//   sum_{t>p} x_t - sum_{s>=p} z_s  =  X - P_x(<=p) - S_z(>=p)
// with x_t = r_t dr0_t and z_s = k_s dk0_s (this term's row outputs without the bonus), X the total
// of x, S/P suffix/prefix sums in time. For the backward-in-time term (pairs query t < p < key s),
// with x'_t = r_t dr1_t, z'_s = k_s dk1_s,
//   sum_{t<p} x'_t - sum_{s<=p} z'_s  =  X' - S_x'(>=p) - P_z'(<=p).
// The four sweeps (query dir 0 gives x, query dir 1 x', key dir 0 z', key dir 1 z) each add their
// running sum, inclusive in their own order, onto an fp32 buffer G; the last one starts its sum at
// -(X + X') and writes d(w) = -(G + its sum) * d(log w)/d(w_raw), once, in the input dtype. This
// form subtracts long sums (flash-linear-attention's): fine for bf16/fp16 outputs with the row
// outputs from 3xTF32 products (docs/cuda.md gives the measured error), while fp32 inputs keep v1's
// stored-state backward.
#pragma once

#include "chunk_load.cuh"
#include "sweep_tiles.cuh"

namespace rwkvclip {

__device__ __forceinline__ float from_float(float x, float) { return x; }
__device__ __forceinline__ __nv_bfloat16 from_float(float x, __nv_bfloat16) { return __float2bfloat16(x); }
__device__ __forceinline__ __half from_float(float x, __half) { return __float2half(x); }

// Output element `offset` of a [B, T, H, N] tensor in the input dtype: the first writer stores,
// the second adds onto what the first stored (a plain load: the data were written in this kernel,
// so not through the read-only cache).
template <int kType>
__device__ __forceinline__ void emit(void* out, InputType type, int64_t offset, float value, bool first) {
  with_element_type<kType>(type, [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(out) + offset;
    store_global(p, from_float(first ? value : value + to_float(read_global(p)), tag));
  });
}

// After a v2 sweep's outputs (s.inter holds p * row output per position, s.outer the running sum
// entering the chunk, `carry` of thread j < N the same in a register): every thread takes chunk
// elements, sums its channel up to its position and applies it to G (stage 0 stores, 1 and 2 add,
// 3 writes d(w)); thread j < N then carries its channel's chunk total into the next chunk.
template <int N, int kType>
__device__ __forceinline__ void decay_gradient_running_sums(const SweepParams& prm, const Tiles<N>& s,
                                                            const Position& pos, int tid, int stage, float& carry) {
  constexpr int LD = Tiles<N>::LD;
#pragma unroll 1
  for (int idx = tid; idx < kChunk * N; idx += kThreads) {
    const int i = idx / N, j = idx % N;
    if (pos.time_of(i) >= pos.T) continue;
    float run = s.outer[j];
    for (int m = 0; m <= i; ++m) run += s.inter[m * LD + j];
    float* g = prm.dw_scratch + pos.offset(i, j);
    if (stage == 0) {
      store_global(g, run);
    } else if (stage < 3) {
      store_global(g, read_global(g) + run);
    } else {
      const float lw = s.lw[i * LD + j];
      const float dlw_dw = lw > kLogDecayMin ? lw : 0.f;  // d(log w)/d(w_raw) = log w; 0 where clamped
      emit<kType>(prm.dw_typed, prm.type, pos.offset(i, j), -(read_global(g) + run) * dlw_dw, true);
    }
  }
  if (tid < N)
    for (int m = 0; m < kChunk; ++m) carry += s.inter[m * LD + tid];
}

}  // namespace rwkvclip
