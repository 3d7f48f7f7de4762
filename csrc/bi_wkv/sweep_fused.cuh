// The v2 Bi-WKV kernels: one block per (batch, head), blockIdx.x = b * H + h, running the sweeps of
// sweep_kernel.cuh one after another, so that outputs are written once per sweep in the input dtype
// and nothing passes between blocks (fused_outputs.cuh):
//   forward:  direction 0 stores y (with the bonus), direction 1 adds its share;
//   backward: query dir 0 (dr, x), query dir 1 (dr, x'), key dir 1 (dk, dv, z), key dir 0 (dk, dv,
//             z', du, and d(w) from the four running sums); no stored states.
#pragma once

#include "sweep_kernel.cuh"

namespace rwkvclip {

template <int N, Fused KIND>
__global__ void __launch_bounds__(kThreads, 2) fused_kernel(SweepParams query, SweepParams key) {
  extern __shared__ __align__(128) float smem[];
  const Tiles<N> s(smem);
  float du_acc = 0.f, carry = 0.f, totals = 0.f;  // thread j < N owns channel j of du and the running sums
  if constexpr (KIND == Fused::kForward) {
    sweep_pass<N, Sweep::kForward, true>(query, s, 0, 0, du_acc, carry);
    sweep_pass<N, Sweep::kForward, true>(query, s, 1, 1, du_acc, carry);
  } else {
    sweep_pass<N, Sweep::kQuery, true>(query, s, 0, 0, du_acc, carry);
    carry = 0.f;
    sweep_pass<N, Sweep::kQuery, true>(query, s, 1, 1, du_acc, carry);
    totals = carry, carry = 0.f;  // X', the total of x'
    sweep_pass<N, Sweep::kKey, true>(key, s, 1, 2, du_acc, carry);
    carry = -(totals + carry);  // -(X' + Z): the last sweep's sum starts there
    sweep_pass<N, Sweep::kKey, true>(key, s, 0, 3, du_acc, carry);
    if (threadIdx.x < N) store_global(key.du_part + int64_t(blockIdx.x) * N + threadIdx.x, du_acc);
  }
}

}  // namespace rwkvclip
