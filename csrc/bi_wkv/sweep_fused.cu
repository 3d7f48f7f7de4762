// Host-side launch of the v2 kernels (sweep_fused.cuh) for every head size, forward and backward.
#include "sweep_fused.cuh"

namespace rwkvclip {

template <int N, Fused KIND>
cudaError_t launch_fused_sized(const SweepParams& query, const SweepParams& key, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;  // no kernel for the type (the fp32 backward is v1's)
  with_fused_type<KIND>(query.type, [&](auto type) {
    auto kernel = fused_kernel<N, KIND, decltype(type)::value>;
    constexpr size_t bytes = SweepSmem<N>::kBytes;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return;
    kernel<<<dim3(unsigned(query.BH)), kThreads, bytes, stream>>>(query, key);
    err = cudaGetLastError();
  });
  return err;
}

template <Fused KIND>
cudaError_t launch_fused(const SweepParams& query, const SweepParams& key, int head_size, cudaStream_t stream) {
  switch (head_size) {
#define RWKVCLIP_CASE(n) \
  case n:                \
    return launch_fused_sized<n, KIND>(query, key, stream);
    RWKVCLIP_FOR_EACH_HEAD_SIZE(RWKVCLIP_CASE)
#undef RWKVCLIP_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

template cudaError_t launch_fused<Fused::kForward>(const SweepParams&, const SweepParams&, int, cudaStream_t);
template cudaError_t launch_fused<Fused::kBackward>(const SweepParams&, const SweepParams&, int, cudaStream_t);

}  // namespace rwkvclip
