// Runs the real CUDA sweep kernels of csrc/bi_wkv on the CPU, for tests on machines without a GPU
// (tests/test_cuda_kernel_on_cpu.py). Compiled by the host compiler: one std::thread per CUDA
// thread of a block, std::barrier as __syncthreads, one block after another over the grid
// (B*H, 2), a static array as the block's shared memory and std::atomic_ref as atomicAdd. It
// executes the same source lines as the GPU, so indexing, padding, the chunk grid, phase order
// and missing barriers (as races between real threads) are tested; warp-level timing is not.
// The tensor-core tile products come from wmma_emulation.h (lane 0 of each warp computes whole
// tiles, with TF32 operand rounding and WMMA's alignment rules checked).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>

namespace rwkvclip_emulation {
struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Index3 thread_index;
inline thread_local Index3 block_index;
inline std::barrier<>* block_barrier = nullptr;
bool is_lane_zero() { return thread_index.x % 32 == 0; }
}  // namespace rwkvclip_emulation

#include "wmma_emulation.h"

// Host compilers see __global__, __device__ and __shared__ as empty (crt/host_defines.h); the
// rest of the CUDA built-ins the kernels use:
#define __launch_bounds__(threads)
#define threadIdx rwkvclip_emulation::thread_index
#define blockIdx rwkvclip_emulation::block_index
inline void __syncthreads() { rwkvclip_emulation::block_barrier->arrive_and_wait(); }
inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
template <typename T>
inline T __ldg(const T* address) {
  return *address;
}

#include "../bi_wkv/sweep_kernel.cuh"

namespace rwkvclip {

// `extern __shared__ float smem[]` in the kernel names this: the shared memory of the one block
// that runs at a time (sized for the largest head size).
alignas(128) float smem[SweepSmem<128>::kFloats];

}  // namespace rwkvclip

#include "../bi_wkv/bi_wkv_host.h"

namespace rwkvclip {

template <int N, Sweep KIND>
void run_grid(const SweepParams& prm) {
  std::barrier<> barrier(kThreads);
  rwkvclip_emulation::block_barrier = &barrier;
  for (unsigned dir = 0; dir < 2; ++dir) {
    for (unsigned bh = 0; bh < unsigned(prm.BH); ++bh) {
      std::vector<std::thread> threads;
      threads.reserve(kThreads);
      for (unsigned t = 0; t < unsigned(kThreads); ++t) {
        threads.emplace_back([&prm, t, bh, dir] {
          rwkvclip_emulation::thread_index = {t, 0, 0};
          rwkvclip_emulation::block_index = {bh, dir, 0};
          sweep_kernel<N, KIND>(prm);
        });
      }
      for (auto& thread : threads) thread.join();
      const std::string error = rwkvclip_emulation::take_error();
      TORCH_CHECK(error.empty(), "bi_wkv emulation, N=", N, ", sweep ", int(KIND), ": ", error);
    }
  }
}

struct EmulatedDevice {
  static constexpr bool kCuda = false;
  template <Sweep KIND>
  static void run(const SweepParams& prm, int64_t head_size) {
    switch (head_size) {
#define RWKVCLIP_CASE(n) \
  case n:                \
    return run_grid<n, KIND>(prm);
      RWKVCLIP_FOR_EACH_HEAD_SIZE(RWKVCLIP_CASE)
#undef RWKVCLIP_CASE
      default:
        TORCH_CHECK(false, "bi_wkv emulation: no kernel for head size N=", head_size);
    }
  }
};

}  // namespace rwkvclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The Bi-WKV CUDA kernels executed on CPU threads (tests only)";
  m.def("forward", &rwkvclip::forward<rwkvclip::EmulatedDevice>);
  m.def("backward", &rwkvclip::backward<rwkvclip::EmulatedDevice>);
}
