// The v2 Bi-WKV kernels: one block per (batch, head), blockIdx.x = b * H + h, running the sweeps of
// sweep_kernel.cuh one after another, so that outputs are written once per sweep in the input dtype
// and nothing passes between blocks (fused_outputs.cuh):
//   forward:  direction 0 stores y (with the bonus), direction 1 adds its share;
//   backward: query dir 0 (dr, x), query dir 1 (dr, x'), key dir 0 (dk, dv, z', du), key dir 1 (dk,
//             dv, z, and d(w) from the four running sums); no stored states.
#pragma once

#include <type_traits>

#include "sweep_kernel.cuh"

namespace rwkvclip {

// Blocks per SM asked of ptxas: at N=64 on sm_90 the three that its 70 KiB of shared memory allow
// (227 KiB per SM), which caps the registers at 80 per thread (the ptxas report shows no spills);
// sm_8x holds only two such blocks (164 KiB or less), where 80 registers would spill for nothing.
// N=80 and 128 get what their shared memory allows (2 and 1); N=16 two, since 80 registers spill.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kBlocksAtN64 = 2;
#else
constexpr int kBlocksAtN64 = 3;
#endif
template <int N>
constexpr int kFusedMinBlocks = N == 64 ? kBlocksAtN64 : (N <= 80 ? 2 : 1);

// kType: the input dtype (an InputType), one kernel each; the backward has no fp32 kernel (fp32
// inputs take v1's backward, bi_wkv_host.h).
template <int N, Fused KIND, int kType>
__global__ void __launch_bounds__(kThreads, kFusedMinBlocks<N>) fused_kernel(SweepParams query, SweepParams key) {
  extern __shared__ __align__(128) float smem[];
  const Tiles<N> s(smem);
  static_assert(KIND == Fused::kForward || kType != int(InputType::kFloat), "fp32 takes v1's backward");
  float du_acc = 0.f, carry = 0.f, totals = 0.f;  // thread j < N owns channel j of du and the running sums
  if constexpr (KIND == Fused::kForward) {
    sweep_pass<N, Sweep::kForward, true, kType>(query, s, 0, 0, du_acc, carry);
    sweep_pass<N, Sweep::kForward, true, kType>(query, s, 1, 1, du_acc, carry);
  } else {
    // each sweep starts where the previous one ended, so its first chunks are the most recently read
    sweep_pass<N, Sweep::kQuery, true, kType>(query, s, 0, 0, du_acc, carry);
    totals = carry, carry = 0.f;  // X, the total of x
    sweep_pass<N, Sweep::kQuery, true, kType>(query, s, 1, 1, du_acc, carry);
    totals += carry, carry = 0.f;  // + X'
    sweep_pass<N, Sweep::kKey, true, kType>(key, s, 0, 2, du_acc, carry);
    carry = -totals;  // the last sweep's sum starts at -(X + X')
    sweep_pass<N, Sweep::kKey, true, kType>(key, s, 1, 3, du_acc, carry);
    if (threadIdx.x < N) store_global(key.du_part + int64_t(blockIdx.x) * N + threadIdx.x, du_acc);
  }
}

// Calls f(std::integral_constant<int, kType>) for the input type of `type` that a v2 kernel of
// KIND exists for; false when there is none (the fp32 backward).
template <Fused KIND, class F>
bool with_fused_type(InputType type, F&& f) {
  switch (type) {
    case InputType::kBFloat16:
      f(std::integral_constant<int, int(InputType::kBFloat16)>{});
      return true;
    case InputType::kHalf:
      f(std::integral_constant<int, int(InputType::kHalf)>{});
      return true;
    default:
      if constexpr (KIND == Fused::kForward) f(std::integral_constant<int, int(InputType::kFloat)>{});
      return KIND == Fused::kForward;
  }
}

}  // namespace rwkvclip
