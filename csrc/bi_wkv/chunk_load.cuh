// How a sweep block finds its tokens and brings a chunk of them from global into shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "sweep_params.h"

namespace rwkvclip {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// The input dtype is a run-time argument (uniform over the grid): v1 compiles one kernel per (head
// size, kind) instead of three, which keeps builds short; only the chunk loads depend on it. This
// calls f(T{}) with the element type, so each load sequence is compiled for its own type. v2
// compiles a kernel per type (kType, an InputType), which lets it size its registers for its type;
// kAnyType switches at run time.
constexpr int kAnyType = -1;

template <int kType = kAnyType, class F>
__device__ __forceinline__ void with_element_type(InputType type, F&& f) {
  if constexpr (kType == int(InputType::kFloat)) {
    f(float{});
  } else if constexpr (kType == int(InputType::kBFloat16)) {
    f(__nv_bfloat16{});
  } else if constexpr (kType == int(InputType::kHalf)) {
    f(__half{});
  } else {
    switch (type) {
      case InputType::kBFloat16:
        f(__nv_bfloat16{});
        break;
      case InputType::kHalf:
        f(__half{});
        break;
      default:
        f(float{});
    }
  }
}

// Plain stores to and loads from global memory (loads of data this kernel wrote, which must not go
// through the read-only cache of __ldg), through functions so that the CPU emulation can count them
// (csrc/testing/cpu_emulation.cpp defines the host versions before including this).
#if defined(__CUDACC__)
template <class T>
__device__ __forceinline__ void store_global(T* p, T x) { *p = x; }
template <class T>
__device__ __forceinline__ T read_global(const T* p) { return *p; }
#endif

// Where a block is: its (batch, head), direction and chunk on the time grid.
struct Position {
  int bh, dir, chunk, chunks, T;
  int64_t head_base;  // element (b, t=0, h, 0)
  int64_t t_stride;   // H * N
  // position i in sweep order -> time index; positions at or past T are padding
  __device__ int time_at(int c, int i) const { return c * kChunk + (dir == 0 ? i : kChunk - 1 - i); }
  __device__ int64_t offset_at(int c, int i, int j) const { return head_base + int64_t(time_at(c, i)) * t_stride + j; }
  __device__ int time_of(int i) const { return time_at(chunk, i); }
  __device__ int64_t offset(int i, int j) const { return offset_at(chunk, i, j); }
};

// The chunk's inputs travel global memory -> registers -> shared memory. Each thread loads whole
// 16-byte vectors (a row of a chunk is N contiguous elements, N a multiple of 16, and the host
// hands in 16-byte aligned tensors), all of a chunk's loads are issued before the first shared
// store, and the next chunk's loads are issued before the current chunk's math, so that they are
// in flight while it runs. The sources are a, b, [p], [q] and last the raw decay w.
template <int N, int kTensors, int kType = kAnyType>
struct ChunkPrefetch {
  // fp32 needs the most vectors (4 elements each); 2-byte types leave the later slots unused (a
  // kernel compiled for a 2-byte type has only the slots it uses: one fewer at N=80 and 128)
  static constexpr int kPerVectorMin = kType == kAnyType || kType == int(InputType::kFloat) ? 4 : 8;
  static constexpr int kSlots = (kChunk * N / kPerVectorMin + kThreads - 1) / kThreads;
  uint4 raw[kTensors][kSlots];

  template <class T>
  static constexpr int kPerVector = 16 / int(sizeof(T));
  template <class T>
  static constexpr int kVectors = kChunk * N / kPerVector<T>;

  template <class T>
  __device__ __forceinline__ void load(const void* const (&src)[kTensors], const Position& pos, int chunk, int tid) {
    constexpr int kPer = kPerVector<T>;
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot) {
      const int vec = tid + slot * kThreads;
      const int i = vec / (N / kPer), j = (vec % (N / kPer)) * kPer;
      if (vec < kVectors<T> && pos.time_at(chunk, i) < pos.T) {
        const int64_t g = pos.offset_at(chunk, i, j);
#pragma unroll
        for (int t = 0; t < kTensors; ++t)
          raw[t][slot] = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(src[t]) + g));
      }
    }
  }

  // Into the [kChunk][LD] fp32 tiles dst (a, b, [p], [q]) and, from the raw decay, the clamped log
  // decay lw and the decay w. Padding (t >= T) gets 0 and lw = 0 (decay 1), so it changes nothing.
  template <class T, int LD>
  __device__ __forceinline__ void store(float* const (&dst)[kTensors - 1], float* lw, float* w, const Position& pos,
                                        int tid) const {
    constexpr int kPer = kPerVector<T>;
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot) {
      const int vec = tid + slot * kThreads;
      if (vec >= kVectors<T>) continue;
      const int i = vec / (N / kPer), j = (vec % (N / kPer)) * kPer;
      const bool ok = pos.time_of(i) < pos.T;
      const int o = i * LD + j;
#pragma unroll
      for (int t = 0; t < kTensors; ++t) {
        const T* e = reinterpret_cast<const T*>(&raw[t][slot]);
        float x[kPer];
#pragma unroll
        for (int q = 0; q < kPer; ++q) x[q] = ok ? to_float(e[q]) : 0.f;
        if (t < kTensors - 1) {
#pragma unroll
          for (int q = 0; q < kPer; q += 4)
            *reinterpret_cast<float4*>(dst[t < kTensors - 1 ? t : 0] + o + q) = make_float4(x[q], x[q + 1], x[q + 2], x[q + 3]);
        } else {
#pragma unroll
          for (int q = 0; q < kPer; ++q) {
            float l = ok ? -expf(x[q]) : 0.f;
            l = l < kLogDecayMin ? kLogDecayMin : l;  // not fmaxf: a NaN decay must stay NaN
            lw[o + q] = l;
            w[o + q] = expf(l);
          }
        }
      }
    }
  }
};

}  // namespace rwkvclip
