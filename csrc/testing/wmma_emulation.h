// The subset of nvcuda::wmma (CUDA's mma.h) that csrc/bi_wkv/tile_mma.cuh uses, for the CPU
// emulation of the kernels. Lane 0 of each emulated warp holds and computes whole tiles (the
// other lanes' fragments stay zero and their loads and stores do nothing), which gives the same
// shared-memory contents after the next barrier as the warp-wide hardware operation.
//
// What it checks, as the hardware requires: tile pointers aligned to 32 bytes and leading
// dimensions a multiple of 4 floats (16 bytes); a violation is recorded and reported by the host
// (take_error()). What it mirrors: mma_sync ignores the 13 low mantissa bits of TF32
// operands (so a forgotten __float_to_tf32 shows up as lost accuracy), __float_to_tf32 rounds to
// nearest with ties away from zero (cvt.rna.tf32.f32), and products are exact. Sums: by default as
// the tensor cores are measured to do them (Fasi et al., "Numerical behavior of NVIDIA tensor
// cores", 2021, on V100/T4/A100; the same reported for H100): a TF32 m16n16k8 product runs as two
// k=4 hardware steps, each adding its four exact products to the accumulator and truncating the
// fp32 result (round toward zero). So a sum carried in an accumulator fragment drifts towards zero
// by about half an ulp per step. set_truncating_accumulation(false) rounds every addition to
// nearest instead (plain fp32). What it cannot mirror: the exact internal alignment of the terms.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>

namespace rwkvclip_emulation {

inline std::atomic<bool> truncating_accumulation{true};
inline std::mutex error_mutex;
inline std::string first_error;

inline void record_error(const char* what, const void* pointer, unsigned ld) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (!first_error.empty()) return;
  char text[160];
  std::snprintf(text, sizeof text, "%s (pointer %p, leading dimension %u)", what, pointer, ld);
  first_error = text;
}

// Empty when every WMMA call so far followed the alignment rules; clears the record.
inline std::string take_error() {
  std::lock_guard<std::mutex> lock(error_mutex);
  std::string error;
  error.swap(first_error);
  return error;
}

bool is_lane_zero();  // defined by cpu_emulation.cpp, which knows the emulated thread index
// cpu_emulation.cpp: counts `bytes` of global-memory traffic at `pointer` when counting is on; a
// pointer in no named tensor is an error unless `may_be_shared` (tiles are mostly in shared memory)
void count_global(const void* pointer, long long bytes, bool store, bool may_be_shared);

inline bool check_tile(const void* pointer, unsigned ld) {
  if (reinterpret_cast<std::uintptr_t>(pointer) % 32 != 0) record_error("WMMA tile not 32-byte aligned", pointer, ld);
  if (ld % 4 != 0) record_error("WMMA leading dimension not a multiple of 16 bytes", pointer, ld);
  return is_lane_zero();
}

inline float truncate_tf32(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits &= 0xffffe000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

// x rounded to float towards zero (what the tensor cores' accumulation does).
inline float round_toward_zero(double x) {
  float f = static_cast<float>(x);  // to nearest
  if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.f);
  return f;
}

}  // namespace rwkvclip_emulation

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  float x[num_elements] = {};  // element (row, col) at row * kCols + col
};

inline float __float_to_tf32(float in) {
  if (!(in == in) || in - in != 0.f) return in;  // NaN and infinities pass through
  std::uint32_t bits;
  std::memcpy(&bits, &in, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;  // round half away from zero on the magnitude
  std::memcpy(&in, &bits, 4);
  return in;
}

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (float& e : f.x) e = value;
}

template <class Use, int M, int N, int K, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, precision::tf32, Layout>& f, const float* p, unsigned ld) {
  using F = fragment<Use, M, N, K, precision::tf32, Layout>;
  if (!rwkvclip_emulation::check_tile(p, ld)) return;
  rwkvclip_emulation::count_global(p, sizeof(float) * F::num_elements, false, true);
  constexpr bool kRowMajor = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c) f.x[r * F::kCols + c] = kRowMajor ? p[r * ld + c] : p[c * ld + r];
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ld, layout_t layout) {
  if (!rwkvclip_emulation::check_tile(p, ld)) return;
  rwkvclip_emulation::count_global(p, sizeof(float) * M * N, false, true);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ld + c] : p[c * ld + r];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ld, layout_t layout) {
  if (!rwkvclip_emulation::check_tile(p, ld)) return;
  rwkvclip_emulation::count_global(p, sizeof(float) * M * N, true, true);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.x[r * N + c];
}

template <int M, int N, int K, class LayoutA, class LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, precision::tf32, LayoutA>& a,
              const fragment<matrix_b, M, N, K, precision::tf32, LayoutB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  if (!rwkvclip_emulation::is_lane_zero()) return;
  using rwkvclip_emulation::truncate_tf32;
  constexpr int kStep = 4;  // the k extent of one hardware step (HMMA.1684 for TF32)
  const bool truncating = rwkvclip_emulation::truncating_accumulation.load(std::memory_order_relaxed);
  float out[M * N];
  for (int r = 0; r < M; ++r) {
    for (int col = 0; col < N; ++col) {
      float sum = c.x[r * N + col];
      for (int k0 = 0; k0 < K; k0 += kStep) {
        if (truncating) {
          double exact = sum;  // TF32 products are exact in double, and so (nearly) is this sum
          for (int k = k0; k < k0 + kStep; ++k)
            exact += double(truncate_tf32(a.x[r * K + k])) * double(truncate_tf32(b.x[k * N + col]));
          sum = rwkvclip_emulation::round_toward_zero(exact);
        } else {
          for (int k = k0; k < k0 + kStep; ++k) sum += truncate_tf32(a.x[r * K + k]) * truncate_tf32(b.x[k * N + col]);
        }
      }
      out[r * N + col] = sum;
    }
  }
  std::memcpy(d.x, out, sizeof out);
}

}  // namespace nvcuda::wmma
