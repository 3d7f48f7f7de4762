// What the host passes to a Bi-WKV sweep. Plain C++ and the CUDA runtime API only: the .cu files
// include no torch header, which keeps each of them a few seconds of nvcc instead of a minute.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace rwkvclip {

constexpr int kChunk = 16;
constexpr int kThreads = 256;
// exp(-60) ~ 1e-26: any stronger decay is numerically zero, and the clamp keeps the chunk-local
// cumulative sums small enough that their differences stay accurate in fp32.
constexpr float kLogDecayMin = -60.f;

enum class Sweep : int {
  kForward = 0,  // a=k, b=v, p=r: column output = y
  kQuery = 1,    // a=k, b=v, q=dy: row output = dr; stores the state entering every chunk
  kKey = 2,      // a=r, b=dy, p=k, q=v: row = dk, column = dv, plus d(w) and d(u)
};

enum class InputType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// Head sizes with a compiled kernel; keep in step with SUPPORTED_HEAD_SIZES in bi_wkv_cuda.py
// (tests/test_cuda_build.py compares them).
#define RWKVCLIP_FOR_EACH_HEAD_SIZE(X) X(16) X(64) X(80) X(128)

// The most dynamic shared memory a block may opt into on sm_80 (A100: 163 KiB); sm_86/89/120 allow
// only ~99 KiB, which the Python dispatch rule checks against the device (bi_wkv_cuda.py).
constexpr size_t kSmemCapSm80 = 163 * 1024;

template <int N>
struct SweepSmem {
  // 11 [chunk x N] tiles, 2 [chunk x chunk] tiles (each a multiple of 8 floats, so every tile starts
  // 32-byte aligned after an aligned base, WMMA's rule), then 2 [N] and 1 [chunk] vectors
  static constexpr size_t floats_for(int ld) {
    return size_t(N) * ld + 11 * size_t(kChunk) * ld + 2 * kChunk * kChunk + 2 * N + kChunk;
  }
  // Row stride: a multiple of 4 floats (16 bytes), as WMMA tiles need. N + 8 puts the rows of a
  // 16 x 16 accumulator tile 8 banks apart, so the 8-byte fragment accesses of a half-warp (four
  // rows) cover the 32 banks once; N + 4 gives 2-way conflicts. N = 128 keeps N + 4: with N + 8
  // the block would need 164.6 KiB, over sm_80's cap.
  static constexpr int LD = floats_for(N + 8) * sizeof(float) <= kSmemCapSm80 ? N + 8 : N + 4;
  static constexpr int kTile = kChunk * LD;
  static constexpr size_t kFloats = floats_for(LD);
  static constexpr size_t kBytes = kFloats * sizeof(float);
  static_assert(N % 16 == 0, "head sizes are multiples of the 16-wide tensor-core tiles");
  static_assert(kBytes <= kSmemCapSm80, "the block's shared memory must fit sm_80");
};

struct SweepParams {
  const void* a;
  const void* b;
  const void* p;
  const void* q;
  const void* w;           // raw decay, [B, T, H, N]
  const float* u;          // [H, N]
  float* row_out;          // fp32 [B, T, H, N], accumulated by both directions
  float* col_out;          // fp32 [B, T, H, N], accumulated by both directions
  float* dw_out;           // fp32 [B, T, H, N] (kKey)
  float* du_part;          // fp32 [B*H, N] (kKey, direction 0 only)
  float* states_out;       // fp32 [2, B*H, chunks, N, N] (kQuery)
  const float* states_in;  // the same buffer, read by kKey
  void* row_typed;         // v2: [B, T, H, N] in the input dtype, written once by the block's sweeps
  void* col_typed;
  void* dw_typed;
  float* dw_scratch;       // v2 backward: fp32 [B, T, H, N], the d(w) running sums (fused_outputs.cuh)
  InputType type;          // of a, b, p, q and w
  int T;
  int H;
  int BH;
};

// Defined in sweep_{forward,query,key}.cu for the three kinds.
template <Sweep KIND>
cudaError_t launch_sweep(const SweepParams& prm, int head_size, cudaStream_t stream);

// v2 (sweep_fused.cuh): one block per (batch, head) runs both directions of the forward, or all four
// sweeps of the backward (query: a=k, b=v, p=r, q=dy; key: a=r, b=dy, p=k, q=v).
enum class Fused : int { kForward = 0, kBackward = 1 };

// Defined in sweep_fused.cu; `key` is ignored by kForward.
template <Fused KIND>
cudaError_t launch_fused(const SweepParams& query, const SweepParams& key, int head_size, cudaStream_t stream);

}  // namespace rwkvclip
