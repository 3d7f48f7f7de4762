// Warp-level 16 x 16 tile products on the tensor cores (WMMA, TF32, m16n16k8), accumulated in fp32.
//
// TF32 keeps 10 mantissa bits: one product per operand pair is enough for bf16/fp16 inputs, whose
// own rounding is coarser, but not for fp32 inputs (SPEC: 1e-5). With `split`, each operand is
// written as hi + lo, both TF32, and a b ~ a_lo b_hi + a_hi b_lo + a_hi b_hi (the lo*lo term is
// below fp32's own rounding): three tensor-core products at fp32 accuracy, still cheaper than
// the CUDA cores (the "3xTF32" scheme of CUTLASS).
//
// Tiles live in shared memory as fp32 with a leading dimension that is a multiple of 4 floats and
// a base aligned to 32 bytes, as WMMA requires. nvcuda::wmma's load/store take generic pointers and
// nvcc emits generic loads (LD, not LDS) for them even when the pointer is a __shared__ array, so
// on the GPU the shared-memory tiles go through the PTX wmma.load/store .shared forms below;
// B operands in global memory (the stored states) use the .global form. On the host (the CPU
// emulation of csrc/testing) nvcuda::wmma comes from csrc/testing/wmma_emulation.h, which checks
// the alignment rules and models the tensor cores' rounding.
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

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

template <class Layout>
constexpr bool kRowMajor = std::is_same_v<Layout, wmma::row_major>;

// The TF32 operand fragments are four .b32 registers per lane; the accumulator eight .f32.
#define RWKVCLIP_LOAD_OPERAND(ROLE, LAYOUT)                                                                    \
  asm volatile("wmma.load." ROLE ".sync.aligned." LAYOUT ".m16n16k8.shared.tf32 {%0, %1, %2, %3}, [%4], %5;" \
               : "=r"(bits[0]), "=r"(bits[1]), "=r"(bits[2]), "=r"(bits[3])                                 \
               : "r"(shared_address(p)), "r"(ld)                                                             \
               : "memory")

template <class Layout>
__device__ __forceinline__ void load_shared(ATile<Layout>& f, const float* p, unsigned ld) {
  unsigned bits[4];
  if constexpr (kRowMajor<Layout>) RWKVCLIP_LOAD_OPERAND("a", "row"); else RWKVCLIP_LOAD_OPERAND("a", "col");
#pragma unroll
  for (int e = 0; e < 4; ++e) f.x[e] = __uint_as_float(bits[e]);
}

template <class Layout>
__device__ __forceinline__ void load_shared(BTile<Layout>& f, const float* p, unsigned ld) {
  unsigned bits[4];
  if constexpr (kRowMajor<Layout>) RWKVCLIP_LOAD_OPERAND("b", "row"); else RWKVCLIP_LOAD_OPERAND("b", "col");
#pragma unroll
  for (int e = 0; e < 4; ++e) f.x[e] = __uint_as_float(bits[e]);
}

// The key sweep's B operand straight from global memory (the stored states), column-major.
__device__ __forceinline__ void load_global(BTile<wmma::col_major>& f, const float* p, unsigned ld) {
  unsigned bits[4];
  asm volatile("wmma.load.b.sync.aligned.col.m16n16k8.global.tf32 {%0, %1, %2, %3}, [%4], %5;"
               : "=r"(bits[0]), "=r"(bits[1]), "=r"(bits[2]), "=r"(bits[3])
               : "l"(__cvta_generic_to_global(p)), "r"(ld)
               : "memory");
#pragma unroll
  for (int e = 0; e < 4; ++e) f.x[e] = __uint_as_float(bits[e]);
}
#undef RWKVCLIP_LOAD_OPERAND

// Accumulator tiles, row-major [16][ld] in shared memory.
__device__ __forceinline__ void load_shared(AccTile& f, const float* p, unsigned ld) {
  static_assert(AccTile::num_elements == 8, "m16n16k8 f32 accumulators hold 8 elements per lane");
  asm volatile("wmma.load.c.sync.aligned.row.m16n16k8.shared.f32 {%0, %1, %2, %3, %4, %5, %6, %7}, [%8], %9;"
               : "=f"(f.x[0]), "=f"(f.x[1]), "=f"(f.x[2]), "=f"(f.x[3]), "=f"(f.x[4]), "=f"(f.x[5]), "=f"(f.x[6]),
                 "=f"(f.x[7])
               : "r"(shared_address(p)), "r"(ld)
               : "memory");
}

__device__ __forceinline__ void store_shared(float* p, const AccTile& f, unsigned ld) {
  asm volatile("wmma.store.d.sync.aligned.row.m16n16k8.shared.f32 [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, %9;"
               :
               : "r"(shared_address(p)), "f"(f.x[0]), "f"(f.x[1]), "f"(f.x[2]), "f"(f.x[3]), "f"(f.x[4]),
                 "f"(f.x[5]), "f"(f.x[6]), "f"(f.x[7]), "r"(ld)
               : "memory");
}
#else
template <class Fragment>
__device__ __forceinline__ void load_shared(Fragment& f, const float* p, unsigned ld) {
  wmma::load_matrix_sync(f, p, ld);
}
__device__ __forceinline__ void load_shared(AccTile& f, const float* p, unsigned ld) {
  wmma::load_matrix_sync(f, p, ld, wmma::mem_row_major);
}
__device__ __forceinline__ void store_shared(float* p, const AccTile& f, unsigned ld) {
  wmma::store_matrix_sync(p, f, ld, wmma::mem_row_major);
}
template <class Fragment>
__device__ __forceinline__ void load_global(Fragment& f, const float* p, unsigned ld) {
  wmma::load_matrix_sync(f, p, ld);
}
#endif

// Where the B operand of a product lives: shared-memory tiles, or global memory (the states the
// query sweep stored, read by the key sweep).
enum class Space { kShared, kGlobal };

// Offset of the k-th slice of a tile: A is [16 x K] (k runs along a row when row-major), B is
// [K x 16] (k runs down a column when col-major).
template <class Layout, bool kIsA>
__device__ __forceinline__ int k_offset(int k, unsigned ld) {
  constexpr bool kAlongRow = std::is_same_v<Layout, wmma::row_major> == kIsA;
  return kAlongRow ? k : k * int(ld);
}

// acc += A B for A [16 x K] at `a` (shared memory) and B [K x 16] at `b` (in `kBSpace`), each
// stored in its Layout with leading dimension lda / ldb. Every lane of the warp calls it with the
// same arguments.
template <int K, class LayoutA, class LayoutB, Space kBSpace = Space::kShared>
__device__ __forceinline__ void mma_accumulate(AccTile& acc, const float* a, unsigned lda, const float* b,
                                               unsigned ldb, bool split) {
  static_assert(K % kMmaK == 0, "the k extent must be a multiple of 8");
#pragma unroll 2
  for (int k = 0; k < K; k += kMmaK) {
    ATile<LayoutA> a_hi, a_lo;
    BTile<LayoutB> b_hi, b_lo;
    load_shared(a_hi, a + k_offset<LayoutA, true>(k, lda), lda);
    if constexpr (kBSpace == Space::kShared)
      load_shared(b_hi, b + k_offset<LayoutB, false>(k, ldb), ldb);
    else
      load_global(b_hi, b + k_offset<LayoutB, false>(k, ldb), ldb);
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

// M += A B for an fp32 tile M [16 x 16] in shared memory that carries a sum over many products
// (the sweep's state). The tensor cores do not round their fp32 sums to nearest (published
// measurements on A100 and H100 show truncation), so accumulating straight onto M would bias it
// towards zero once per product, chunk after chunk. The product goes into a zeroed fragment, and
// is added to M element-wise on the CUDA cores (round to nearest): one unbiased rounding per chunk.
template <int K, class LayoutA, class LayoutB>
__device__ __forceinline__ void mma_add_to(float* m, unsigned ldm, const float* a, unsigned lda, const float* b,
                                           unsigned ldb, bool split) {
  AccTile product, sum;
  wmma::fill_fragment(product, 0.f);
  mma_accumulate<K, LayoutA, LayoutB>(product, a, lda, b, ldb, split);
  load_shared(sum, m, ldm);
#pragma unroll
  for (int e = 0; e < sum.num_elements; ++e) sum.x[e] += product.x[e];  // same layout: element-wise is valid
  store_shared(m, sum, ldm);
}

}  // namespace rwkvclip
