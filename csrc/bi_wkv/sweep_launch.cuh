// Host-side launch of one sweep kind for every compiled head size. Each .cu file includes this and
// instantiates one kind, so ninja compiles the three kinds in parallel.
#pragma once

#include "sweep_kernel.cuh"

namespace rwkvclip {

template <int N, Sweep KIND>
cudaError_t launch_sized(const SweepParams& prm, cudaStream_t stream) {
  auto kernel = sweep_kernel<N, KIND>;
  constexpr size_t bytes = SweepSmem<N>::kBytes;
  // beyond the 48 KiB default a kernel must opt in; sm_80 allows 163 KiB, sm_90 227 KiB
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(2 * unsigned(prm.BH)), kThreads, bytes, stream>>>(prm);
  return cudaGetLastError();
}

template <Sweep KIND>
cudaError_t launch_sweep(const SweepParams& prm, int head_size, cudaStream_t stream) {
  switch (head_size) {
#define RWKVCLIP_CASE(n) \
  case n:                \
    return launch_sized<n, KIND>(prm, stream);
    RWKVCLIP_FOR_EACH_HEAD_SIZE(RWKVCLIP_CASE)
#undef RWKVCLIP_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace rwkvclip
