// Tile I/O of the CUDA attention engine: rows into shared tiles (tile_offset) with cp.async, the
// non-finite checks of what a thread copied, and the block-wide votes the exact pass uses.
// Where a row comes from is the policy's business: copy_rows takes a row -> offset function.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/attention_params.h"
#include "tokenmix/cuda/warp_gemm.h"

namespace tokenmix::cuda {

// Copies `rows` rows of `width` elements (a multiple of the 16-byte vector) into a shared tile with
// cp.async, zero-filling columns at or past `valid_cols` and rows without a source (src(r) < 0).
// src(r) is the element offset of row r's column `col0` in `base`.
template <class T, class Lay, class Src>
TM_DEVICE void copy_rows(shared_ptr<T> dst, Lay ld, int rows, int width, global_ptr<const T> base,
                         int col0, int valid_cols, Src&& src) {
  constexpr int vec = kVec<T>;
  const int segs = width / vec;
  for (int s = int(linear_thread_idx()); s < rows * segs; s += kThreads) {
    const int r = s / segs, c = (s - r * segs) * vec;
    const int64_t off = src(r);
    const bool in = off >= 0 && col0 + c < valid_cols;
    cp_async_zfill<16>(dst + tile_offset(ld, r, c), in ? base + off + c : base, in ? 16 : 0);
  }
}

// Whether the 16-byte segments this thread copied with copy_rows(dst, ld, rows, width, ...) hold
// an inf or NaN in columns [col_lo, col_hi). It reads only the thread's own cp.async destinations,
// which are visible to it right after cp_async_wait_group, so it runs before the barrier that
// publishes the tile; block_any then combines the threads at that barrier.
template <class E, class Lay>
TM_DEVICE bool copied_nonfinite(shared_ptr<typename E::T> dst, Lay ld, int rows, int width,
                                int col_lo, int col_hi) {
  constexpr int vec = kVec<typename E::T>;
  const int segs = width / vec;
  bool bad = false;
  for (int s = int(linear_thread_idx()); s < rows * segs; s += kThreads) {
    const int r = s / segs, c = (s - r * segs) * vec;
    if (c >= col_lo && c < col_hi) bad |= any_nonfinite<E>(load128(dst + tile_offset(ld, r, c)));
  }
  return bad;
}

// A block-wide OR taken at a barrier: block_any_vote before it (each warp votes, its lane 0 writes
// the warp's word), block_any_result after it. A set of words may be voted again only after
// another barrier has passed (every thread has read the last result), so the kernels give each
// vote that is not separated from the previous one by a barrier its own set.
TM_DEVICE void block_any_vote(shared_ptr<int> words, bool pred) {
  const int any = any_sync(0xffffffffu, pred ? 1 : 0);
  if (lane_id() == 0) words[warp_id()] = any;
}
TM_DEVICE bool block_any_result(shared_ptr<int> words) {
  int any = 0;
  for (int w = 0; w < kWarps; ++w) any |= words[w];
  return any != 0;
}

// Whether any of a thread's accumulator fragments is inf or NaN (x - x is 0 only for a finite x).
template <int N>
TM_DEVICE bool any_nonfinite_acc(const float (&acc)[N][4]) {
  bool bad = false;
  TM_UNROLL
  for (int n = 0; n < N; ++n) {
    TM_UNROLL
    for (int i = 0; i < 4; ++i) bad |= (acc[n][i] - acc[n][i]) != 0.0f;
  }
  return bad;
}

template <int N>
TM_DEVICE void zero_acc(float (&acc)[N][4]) {
  TM_UNROLL
  for (int n = 0; n < N; ++n) {
    TM_UNROLL
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
  }
}

}  // namespace tokenmix::cuda
