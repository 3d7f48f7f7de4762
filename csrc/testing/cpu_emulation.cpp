// Runs the real CUDA sweep kernels of csrc/bi_wkv on the CPU, for tests on machines without a GPU
// (tests/test_cuda_kernel_on_cpu.py). Compiled by the host compiler: one std::thread per CUDA
// thread of a block, std::barrier as __syncthreads, one block after another over the grid
// (2 B H for the v1 sweeps, B H for the v2 kernels of sweep_fused.cuh), a static array as the
// block's shared memory and std::atomic_ref as atomicAdd. It executes the same source lines as the GPU, so indexing, padding, the chunk grid, phase order
// and missing barriers (as races between real threads) are tested; warp-level timing is not.
// The tensor-core tile products come from wmma_emulation.h (lane 0 of each warp computes whole
// tiles, with TF32 operand rounding and WMMA's alignment rules checked).
//
// With set_traffic_counting(True) it also counts the global-memory bytes the kernel source loads
// and stores (every __ldg, atomicAdd, store_global and WMMA tile load or store of a counted
// tensor, and v2's typed stores and read-backs (store_global, read_global); an atomicAdd counts 4
// bytes loaded and 4 stored), per tensor and pass, together with
// what the host code's torch operations move (zero-fills, casts: bi_wkv_host.h's host_pass). The
// host names each tensor a kernel may touch; a global access outside all of them is reported as
// an error. take_traffic() returns and clears the counts (tools/bench_wkv_traffic.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <atomic>
#include <barrier>
#include <cmath>
#include <algorithm>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "wmma_emulation.h"

namespace rwkvclip_emulation {
struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Index3 thread_index;
inline thread_local Index3 block_index;
inline std::barrier<>* block_barrier = nullptr;
inline std::deque<std::barrier<>>* warp_barriers = nullptr;  // one per warp, 32 lanes each
inline float shuffle_slots[1024];                             // one per thread of the block
bool is_lane_zero() { return thread_index.x % 32 == 0; }

// -- traffic counting: the named tensors of the current call, the pass the kernels belong to, and
//    per thread (no contention while the block runs) the bytes per tensor, merged when it ends.
//    Besides every byte requested, the bytes touched for the first time in the pass: what DRAM
//    moves if the cache serves every repeat within a pass (the two direction blocks of a head
//    read the same inputs; atomics of both directions meet in L2), and a lower bound otherwise.
struct NamedRange {
  std::string name;
  const char* begin;
  const char* end;
  std::unique_ptr<std::atomic<std::uint8_t>[]> seen;  // per byte: bit 0 loaded, bit 1 stored in this pass
};
struct Bytes {
  long long loaded = 0, stored = 0, first_loaded = 0, first_stored = 0;
};
inline std::atomic<bool> counting{false};
inline std::vector<NamedRange> ranges;  // set by the host thread between launches
inline std::string current_pass;
inline std::map<std::pair<std::string, std::string>, Bytes> traffic;  // (pass, tensor)
inline std::mutex traffic_mutex;
inline thread_local std::vector<Bytes> thread_bytes;

void count_global(const void* pointer, long long bytes, bool store, bool may_be_shared) {
  if (!counting.load(std::memory_order_relaxed)) return;
  const char* p = static_cast<const char*>(pointer);
  for (size_t i = 0; i < ranges.size(); ++i) {
    NamedRange& range = ranges[i];
    if (p >= range.begin && p + bytes <= range.end) {
      if (thread_bytes.size() < ranges.size()) thread_bytes.resize(ranges.size());
      const std::uint8_t bit = store ? 2 : 1;
      long long first = 0;
      for (long long b = 0; range.seen && b < bytes; ++b) first += !(range.seen[p - range.begin + b].fetch_or(bit) & bit);
      Bytes& counted = thread_bytes[i];
      (store ? counted.stored : counted.loaded) += bytes;
      (store ? counted.first_stored : counted.first_loaded) += first;
      return;
    }
  }
  if (!may_be_shared) record_error("global access outside every tensor the host named", pointer, unsigned(bytes));
}

// A kernel launch starts a pass: no byte has been touched in it yet.
void start_pass(const char* name) {
  current_pass = name;
  if (!counting) return;
  for (NamedRange& range : ranges)
    for (long long b = 0; range.seen && b < range.end - range.begin; ++b) range.seen[b].store(0, std::memory_order_relaxed);
}

void flush_thread_bytes() {
  if (thread_bytes.empty()) return;
  std::lock_guard<std::mutex> lock(traffic_mutex);
  for (size_t i = 0; i < thread_bytes.size(); ++i) {
    const Bytes& b = thread_bytes[i];
    if (b.loaded == 0 && b.stored == 0) continue;
    Bytes& total = traffic[{current_pass, ranges[i].name}];
    total.loaded += b.loaded;
    total.stored += b.stored;
    total.first_loaded += b.first_loaded;
    total.first_stored += b.first_stored;
  }
  thread_bytes.clear();
}
}  // namespace rwkvclip_emulation

// Host compilers see __global__, __device__ and __shared__ as empty (crt/host_defines.h); the
// rest of the CUDA built-ins the kernels use:
#define __launch_bounds__(threads, min_blocks)
#define threadIdx rwkvclip_emulation::thread_index
#define blockIdx rwkvclip_emulation::block_index
inline void __syncthreads() { rwkvclip_emulation::block_barrier->arrive_and_wait(); }
inline float atomicAdd(float* address, float value) {
  rwkvclip_emulation::count_global(address, 4, false, false);
  rwkvclip_emulation::count_global(address, 4, true, false);
  return std::atomic_ref<float>(*address).fetch_add(value);
}
template <typename T>
inline T __ldg(const T* address) {
  rwkvclip_emulation::count_global(address, sizeof(T), false, false);
  return *address;
}
// The chunk loads read 16-byte vectors, which the GPU requires to be 16-byte aligned.
inline uint4 __ldg(const uint4* address) {
  if (reinterpret_cast<std::uintptr_t>(address) % 16 != 0)
    rwkvclip_emulation::record_error("16-byte vector load from an address not 16-byte aligned", address, 0);
  rwkvclip_emulation::count_global(address, 16, false, false);
  return *address;
}
namespace rwkvclip {
template <class T>
void store_global(T* p, T x) {
  rwkvclip_emulation::count_global(p, sizeof(T), true, false);
  *p = x;
}
template <class T>
T read_global(const T* p) {
  rwkvclip_emulation::count_global(p, sizeof(T), false, false);
  return *p;
}
}  // namespace rwkvclip
// Every lane of the warp must take part (the kernels only pass the full mask): each publishes its
// value, waits for the whole warp, reads its partner's, and waits again before the slots are reused.
inline float __shfl_xor_sync(unsigned /*full mask*/, float value, int lane_mask) {
  using namespace rwkvclip_emulation;
  const unsigned t = thread_index.x;
  std::barrier<>& warp = (*warp_barriers)[t / 32];
  shuffle_slots[t] = value;
  warp.arrive_and_wait();
  const float other = shuffle_slots[t ^ unsigned(lane_mask)];
  warp.arrive_and_wait();
  return other;
}

#include "../bi_wkv/sweep_fused.cuh"

namespace rwkvclip {

// `extern __shared__ float smem[]` in the kernel names this: the shared memory of the one block
// that runs at a time (sized for the largest head size).
alignas(128) float smem[SweepSmem<128>::kFloats];

}  // namespace rwkvclip

#include "../bi_wkv/bi_wkv_host.h"

namespace rwkvclip {

constexpr const char* kPassNames[] = {"forward: sweep", "backward: query sweep", "backward: key sweep"};

template <int N, Sweep KIND>
void run_grid(const SweepParams& prm) {
  rwkvclip_emulation::start_pass(kPassNames[int(KIND)]);
  std::barrier<> barrier(kThreads);
  rwkvclip_emulation::block_barrier = &barrier;
  std::deque<std::barrier<>> warps;  // barriers cannot move: a deque constructs them in place
  for (int w = 0; w < kThreads / 32; ++w) warps.emplace_back(32);
  rwkvclip_emulation::warp_barriers = &warps;
  for (unsigned dir = 0; dir < 2; ++dir) {
    for (unsigned bh = 0; bh < unsigned(prm.BH); ++bh) {
      std::vector<std::thread> threads;
      threads.reserve(kThreads);
      for (unsigned t = 0; t < unsigned(kThreads); ++t) {
        threads.emplace_back([&prm, t, bh, dir] {
          rwkvclip_emulation::thread_index = {t, 0, 0};
          rwkvclip_emulation::block_index = {2 * bh + dir, 0, 0};
          sweep_kernel<N, KIND>(prm);
          rwkvclip_emulation::flush_thread_bytes();
        });
      }
      for (auto& thread : threads) thread.join();
      const std::string error = rwkvclip_emulation::take_error();
      TORCH_CHECK(error.empty(), "bi_wkv emulation, N=", N, ", sweep ", int(KIND), ": ", error);
    }
  }
}

// The v2 kernels: one block per (batch, head), the blocks one after another.
template <int N, Fused KIND, int kType>
void run_fused_grid(const SweepParams& query, const SweepParams& key) {
  rwkvclip_emulation::start_pass(KIND == Fused::kForward ? "forward: v2 kernel" : "backward: v2 kernel");
  std::barrier<> barrier(kThreads);
  rwkvclip_emulation::block_barrier = &barrier;
  std::deque<std::barrier<>> warps;
  for (int w = 0; w < kThreads / 32; ++w) warps.emplace_back(32);
  rwkvclip_emulation::warp_barriers = &warps;
  for (unsigned bh = 0; bh < unsigned(query.BH); ++bh) {
    std::vector<std::thread> threads;
    threads.reserve(kThreads);
    for (unsigned t = 0; t < unsigned(kThreads); ++t) {
      threads.emplace_back([&query, &key, t, bh] {
        rwkvclip_emulation::thread_index = {t, 0, 0};
        rwkvclip_emulation::block_index = {bh, 0, 0};
        fused_kernel<N, KIND, kType>(query, key);
        rwkvclip_emulation::flush_thread_bytes();
      });
    }
    for (auto& thread : threads) thread.join();
    const std::string error = rwkvclip_emulation::take_error();
    TORCH_CHECK(error.empty(), "bi_wkv emulation, N=", N, ", v2 kernel ", int(KIND), ": ", error);
  }
}

template <int N, Fused KIND>
void run_typed(const SweepParams& query, const SweepParams& key) {
  const bool launched = with_fused_type<KIND>(query.type, [&](auto type) { run_fused_grid<N, KIND, decltype(type)::value>(query, key); });
  TORCH_CHECK(launched, "bi_wkv emulation: no v2 kernel for this input type");
}

struct EmulatedDevice {
  static constexpr bool kCuda = false;
  static void tensor(const char* name, const torch::Tensor& t) {
    const char* begin = static_cast<const char*>(t.data_ptr());
    std::unique_ptr<std::atomic<std::uint8_t>[]> seen;  // the first-touch record, only when counting
    if (rwkvclip_emulation::counting) seen.reset(new std::atomic<std::uint8_t>[t.nbytes()]());
    rwkvclip_emulation::ranges.push_back({name, begin, begin + t.nbytes(), std::move(seen)});
  }
  static void host_pass(const char* pass, const char* name, int64_t loaded, int64_t stored) {
    if (!rwkvclip_emulation::counting) return;
    auto& total = rwkvclip_emulation::traffic[{pass, name}];
    total.loaded += loaded, total.first_loaded += loaded;  // a torch pass touches each byte once
    total.stored += stored, total.first_stored += stored;
  }
  template <Fused KIND>
  static void run_fused(const SweepParams& query, const SweepParams& key, int64_t head_size) {
    TORCH_CHECK(query.BH > 0, "bi_wkv emulation: launch of an empty grid (B*H = 0)");
    switch (head_size) {
#define RWKVCLIP_CASE(n) \
  case n:                \
    return run_typed<n, KIND>(query, key);
      RWKVCLIP_FOR_EACH_HEAD_SIZE(RWKVCLIP_CASE)
#undef RWKVCLIP_CASE
      default:
        TORCH_CHECK(false, "bi_wkv emulation: no kernel for head size N=", head_size);
    }
  }
  template <Sweep KIND>
  static void run(const SweepParams& prm, int64_t head_size) {
    // CUDA refuses a launch of zero blocks ("invalid configuration argument"): the host must not ask
    TORCH_CHECK(prm.BH > 0, "bi_wkv emulation: launch of an empty grid (B*H = 0)");
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

// One warp's mma_accumulate (tile_mma.cuh) on the calling thread as lane 0: acc = A B for A
// [16 x K] row-major and B [K x 16] stored row- or column-major, placed `offset` floats past a
// 128-byte boundary (a nonzero offset breaks WMMA's alignment rule). For tests of the TF32
// arithmetic and of the checks; K in {16, 64}.
template <int K>
torch::Tensor run_tile_product(const torch::Tensor& a, const torch::Tensor& b, bool b_col_major, bool split,
                               int64_t offset) {
  struct alignas(128) Buffer {
    float data[2 * 16 * 64 + 64];
  };
  auto buffer = std::make_unique<Buffer>();
  float* pa = buffer->data + offset;
  float* pb = pa + 16 * K + 32;  // keeps B's alignment equal to A's
  const auto ac = a.contiguous(), bc = (b_col_major ? b.t() : b).contiguous();
  std::copy_n(ac.data_ptr<float>(), 16 * K, pa);
  std::copy_n(bc.data_ptr<float>(), 16 * K, pb);
  rwkvclip_emulation::thread_index = {0, 0, 0};
  AccTile acc;
  wmma::fill_fragment(acc, 0.f);
  if (b_col_major)
    mma_accumulate<K, wmma::row_major, wmma::col_major>(acc, pa, K, pb, K, split);
  else
    mma_accumulate<K, wmma::row_major, wmma::row_major>(acc, pa, K, pb, 16, split);
  auto out = torch::empty({16, 16}, a.options());
  wmma::store_matrix_sync(out.data_ptr<float>(), acc, 16, wmma::mem_row_major);
  const std::string error = rwkvclip_emulation::take_error();
  TORCH_CHECK(error.empty(), "tile product: ", error);
  return out;
}

torch::Tensor tile_product(const torch::Tensor& a, const torch::Tensor& b, bool b_col_major, bool split,
                           int64_t offset) {
  TORCH_CHECK(a.dtype() == torch::kFloat32 && b.dtype() == torch::kFloat32, "tile product: float32 only");
  TORCH_CHECK(offset >= 0 && offset < 32, "tile product: offset in [0, 32)");
  const int64_t k = a.size(1);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == 16 && b.dim() == 2 && b.size(0) == k && b.size(1) == 16,
              "tile product: A must be [16, K] and B [K, 16]");
  if (k == 16) return run_tile_product<16>(a, b, b_col_major, split, offset);
  TORCH_CHECK(k == 64, "tile product: K must be 16 or 64");
  return run_tile_product<64>(a, b, b_col_major, split, offset);
}

}  // namespace rwkvclip

namespace rwkvclip {

// The bindings start every call with no named tensors (the host names those of the call).
torch::Tensor emulated_forward(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, torch::Tensor u) {
  rwkvclip_emulation::ranges.clear();
  return forward<EmulatedDevice>(r, k, v, w, u);
}

std::vector<torch::Tensor> emulated_backward(torch::Tensor dy, torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                             torch::Tensor w, torch::Tensor u) {
  rwkvclip_emulation::ranges.clear();
  return backward<EmulatedDevice>(dy, r, k, v, w, u);
}

torch::Tensor emulated_forward_v2(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, torch::Tensor u) {
  rwkvclip_emulation::ranges.clear();
  return forward_v2<EmulatedDevice>(r, k, v, w, u);
}

std::vector<torch::Tensor> emulated_backward_v2(torch::Tensor dy, torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                                torch::Tensor w, torch::Tensor u) {
  rwkvclip_emulation::ranges.clear();
  return backward_v2<EmulatedDevice>(dy, r, k, v, w, u);
}

using TrafficRow = std::tuple<std::string, std::string, int64_t, int64_t, int64_t, int64_t>;

std::vector<TrafficRow> take_traffic() {
  std::vector<TrafficRow> rows;
  for (const auto& [key, b] : rwkvclip_emulation::traffic)
    rows.emplace_back(key.first, key.second, b.loaded, b.stored, b.first_loaded, b.first_stored);
  rwkvclip_emulation::traffic.clear();
  return rows;
}

}  // namespace rwkvclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The Bi-WKV CUDA kernels executed on CPU threads (tests only)";
  m.def("forward", &rwkvclip::emulated_forward);
  m.def("backward", &rwkvclip::emulated_backward);
  m.def("forward_v2", &rwkvclip::emulated_forward_v2);
  m.def("backward_v2", &rwkvclip::emulated_backward_v2);
  m.def(
      "set_traffic_counting", [](bool on) { return rwkvclip_emulation::counting.exchange(on); },
      "count global-memory bytes per (pass, tensor) from now on, or stop; returns the previous mode");
  m.def("take_traffic", &rwkvclip::take_traffic, "[(pass, tensor, bytes loaded, stored, loaded first in the pass, stored first)], then cleared");
  m.def("tile_product", &rwkvclip::tile_product);
  m.def(
      "set_truncating_accumulation",
      [](bool on) { return rwkvclip_emulation::truncating_accumulation.exchange(on); },
      "tensor-core sums truncate (the hardware, default) or round to nearest; returns the previous mode");
}
