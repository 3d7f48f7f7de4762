// The shared-memory tiles of a sweep block (sizes in SweepSmem, sweep_params.h).
#pragma once

#include "sweep_params.h"

namespace rwkvclip {

// Shared-memory layout of one block: the state and the tiles of the current chunk.
template <int N>
struct Tiles {
  static constexpr int LD = SweepSmem<N>::LD;
  static constexpr int TILE = SweepSmem<N>::kTile;
  float* M;       // state [N][LD]
  float* a;       // inputs of the chunk, [kChunk][LD] each
  float* b;
  float* p;
  float* q;
  float* lw;      // clamped log decay
  float* w;       // decay w = exp(log w)
  float* cb;      // inclusive cumulative log decay inside the chunk
  float* pl;      // p_i * exp(cb_{i-1}): p decayed to the chunk start
  float* al;      // a_m * exp(cb_last - cb_m): a decayed to the chunk end
  float* inter;   // row output from previous chunks (kKey: for d(w)); before: keys for the scores
  float* col;     // column output before the bonus term; before: queries for the scores
  float* att;     // [kChunk][kChunk] column-output scores, m < i (0 elsewhere)
  float* dots;    // [kChunk][kChunk] q_i . b_m
  float* decay;   // [N] exp(cb_last): the chunk's total decay per channel
  float* outer;   // [N] v1 kKey: d(w) pairs with the query before and the key after the chunk;
                  // v2: the running sum of d(log w) entering the chunk
  float* beta;    // [kChunk] sum_j a u p (bonus term)

  __device__ explicit Tiles(float* smem)
      : M(smem), a(M + N * LD), b(a + TILE), p(b + TILE), q(p + TILE), lw(q + TILE), w(lw + TILE),
        cb(w + TILE), pl(cb + TILE), al(pl + TILE), inter(al + TILE), col(inter + TILE), att(col + TILE),
        dots(att + kChunk * kChunk), decay(dots + kChunk * kChunk), outer(decay + N), beta(outer + N) {}
};

}  // namespace rwkvclip
