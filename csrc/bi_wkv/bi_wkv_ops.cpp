// Python bindings of the Bi-WKV CUDA kernels. The torch.library op, its autograd and its fake
// implementation live in rwkvclip_dist/ops/bi_wkv_cuda.py, which also checks arguments with
// messages naming them; bi_wkv_host.h allocates and launches.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "bi_wkv_host.h"

namespace rwkvclip {

struct CudaDevice {
  static constexpr bool kCuda = true;
  template <Sweep KIND>
  static void run(const SweepParams& prm, int64_t head_size) {
    C10_CUDA_CHECK(launch_sweep<KIND>(prm, int(head_size), c10::cuda::getCurrentCUDAStream()));
  }
  template <Fused KIND>
  static void run_fused(const SweepParams& query, const SweepParams& key, int64_t head_size) {
    C10_CUDA_CHECK(launch_fused<KIND>(query, key, int(head_size), c10::cuda::getCurrentCUDAStream()));
  }
  // traffic counting is the CPU emulation's (bi_wkv_host.h)
  static void tensor(const char*, const torch::Tensor&) {}
  static void host_pass(const char*, const char*, int64_t, int64_t) {}
};

}  // namespace rwkvclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused Bi-WKV (RWKV-CLIP) forward and backward CUDA kernels";
  m.def("forward", &rwkvclip::forward<rwkvclip::CudaDevice>, "Bi-WKV forward: y = bi_wkv(r, k, v, w, u)");
  m.def("backward", &rwkvclip::backward<rwkvclip::CudaDevice>, "Bi-WKV backward: (dr, dk, dv, dw, du)");
  m.def("forward_v2", &rwkvclip::forward_v2<rwkvclip::CudaDevice>, "v2 (one block per head) forward");
  m.def("backward_v2", &rwkvclip::backward_v2<rwkvclip::CudaDevice>, "v2 backward (v1's for fp32 inputs)");
  m.def("head_sizes", &rwkvclip::head_sizes, "head sizes N with a compiled kernel");
  m.def("shared_memory_bytes", &rwkvclip::shared_memory_bytes, "dynamic shared memory of the sweeps for N");
}
