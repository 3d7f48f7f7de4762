// Warp-level 16 x 16 tile products on the tensor cores (WMMA, TF32, m16n16k8), accumulated in fp32.
//
// TF32 keeps 10 mantissa bits: one product per operand pair is enough for bf16/fp16 inputs, whose
// own rounding is coarser, but not for fp32 inputs (SPEC: 1e-5). With `split`, each operand is
// written as hi + lo, both TF32, and a b ~ a_lo b_hi + a_hi b_lo + a_hi b_hi (the lo*lo term is
// below fp32's own rounding): three tensor-core products at fp32 accuracy, still cheaper than
// the CUDA cores (the "3xTF32" scheme of CUTLASS).
//
// Tiles live in shared (or global) memory as fp32 with a leading dimension that is a multiple of 4
// floats and a base aligned to 32 bytes, as WMMA requires. On the host (the CPU emulation of
// csrc/testing) nvcuda::wmma comes from csrc/testing/wmma_emulation.h, which checks those rules.
#pragma once

#if defined(__CUDACC__)
#include <mma.h>
#endif

#include <type_traits>

namespace rwkvclip {

namespace wmma = nvcuda::wmma;

constexpr int kMmaK = 8;  // the k-depth of one TF32 WMMA product

using AccTile = wmma::fragment<wmma::accumulator, 16, 16, kMmaK, float>;
template <class Layout>
using ATile = wmma::fragment<wmma::matrix_a, 16, 16, kMmaK, wmma::precision::tf32, Layout>;
template <class Layout>
using BTile = wmma::fragment<wmma::matrix_b, 16, 16, kMmaK, wmma::precision::tf32, Layout>;

// Fragments whose elements are still plain fp32: round them to TF32 (the hardware would truncate).
template <class Fragment>
__device__ __forceinline__ void round_to_tf32(Fragment& f) {
#pragma unroll
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
}

// x -> (hi, lo) with x ~ hi + lo, both TF32; `hi` holds x on entry.
template <class Fragment>
__device__ __forceinline__ void split_tf32(Fragment& hi, Fragment& lo) {
#pragma unroll
  for (int e = 0; e < hi.num_elements; ++e) {
    const float x = hi.x[e];
    const float h = wmma::__float_to_tf32(x);
    hi.x[e] = h;
    lo.x[e] = wmma::__float_to_tf32(x - h);
  }
}

// Offset of the k-th slice of a tile: A is [16 x K] (k runs along a row when row-major), B is
// [K x 16] (k runs down a column when col-major).
template <class Layout, bool kIsA>
__device__ __forceinline__ int k_offset(int k, unsigned ld) {
  constexpr bool kAlongRow = std::is_same_v<Layout, wmma::row_major> == kIsA;
  return kAlongRow ? k : k * int(ld);
}

// acc += A B for A [16 x K] at `a` and B [K x 16] at `b`, each stored in its Layout with leading
// dimension lda / ldb. Every lane of the warp calls it with the same arguments.
template <int K, class LayoutA, class LayoutB>
__device__ __forceinline__ void mma_accumulate(AccTile& acc, const float* a, unsigned lda, const float* b,
                                               unsigned ldb, bool split) {
  static_assert(K % kMmaK == 0, "the k extent must be a multiple of 8");
#pragma unroll 2
  for (int k = 0; k < K; k += kMmaK) {
    ATile<LayoutA> a_hi, a_lo;
    BTile<LayoutB> b_hi, b_lo;
    wmma::load_matrix_sync(a_hi, a + k_offset<LayoutA, true>(k, lda), lda);
    wmma::load_matrix_sync(b_hi, b + k_offset<LayoutB, false>(k, ldb), ldb);
    if (split) {
      split_tf32(a_hi, a_lo);
      split_tf32(b_hi, b_lo);
      wmma::mma_sync(acc, a_lo, b_hi, acc);  // small terms first
      wmma::mma_sync(acc, a_hi, b_lo, acc);
    } else {
      round_to_tf32(a_hi);
      round_to_tf32(b_hi);
    }
    wmma::mma_sync(acc, a_hi, b_hi, acc);
  }
}

}  // namespace rwkvclip
