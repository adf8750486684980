// Tile I/O of the CUDA attention engine: rows into shared tiles (tile_offset) with cp.async, the
// non-finite checks of what a thread copied, and the block-wide votes the exact pass uses.
// Where a row comes from is the policy's business: copy_rows takes a row -> offset function.
#pragma once

#include <cstdint>
#include <type_traits>

#include "tokenmix/cuda/attention_params.h"
#include "tokenmix/cuda/warp_gemm.h"

namespace tokenmix::cuda {

// The row copies split a tile's kRows rows among the warps, kRows / kWarps consecutive rows each.
// Lane l of warp w computes the source offset of row warp_row<kRows>() = w * kRows / kWarps + l %
// (kRows / kWarps), once per tile: a row's offset may cost a walk of a key box (two integer
// divisions and 64-bit stride products), which the copy loop must not repeat per 16-byte segment.
// `warp` is the copying warp's place among the kWarps (a block of more warps copies a tile with
// kWarps of them, or gives each group of kWarps its own tile).
template <int kRows>
TM_DEVICE int warp_row(int warp = int(warp_id())) {
  static_assert(kRows % kWarps == 0 && kRows / kWarps <= 32, "whole rows per warp, one per lane");
  constexpr int kPerWarp = kRows / kWarps;
  return warp * kPerWarp + int(lane_id()) % kPerWarp;
}

// Copies kRows rows of `width` elements (a multiple of the 16-byte vector) into a shared tile with
// cp.async, zero-filling columns at or past `valid_cols` and rows without a source (offset < 0).
// `off` is the element offset in `base` of row warp_row<kRows>()'s column `col0` (Offset: int64_t,
// or int32_t where the caller knows that every offset plus the width fits, which saves a shuffle
// and the 64-bit arithmetic per segment); the warp passes each row's offset from its lane with a
// shuffle, and its lanes copy the segments of its rows in row-major order (consecutive lanes,
// consecutive 16-byte segments: coalesced reads, and writes that cover the banks). Every lane of
// the warp must call it; `warp` as for warp_row.
template <int kRows, class T, class Lay, class Offset>
TM_DEVICE void copy_rows_at(shared_ptr<T> dst, Lay ld, int width, global_ptr<const T> base,
                            int col0, int valid_cols, Offset off, int warp = int(warp_id())) {
  static_assert(std::is_same_v<Offset, int64_t> || std::is_same_v<Offset, int32_t>,
                "row offsets are int64_t or int32_t");
  constexpr int vec = kVec<T>, kPerWarp = kRows / kWarps;
  const int segs = width / vec, lane = int(lane_id());
  const int row0 = warp * kPerWarp;
  const auto row_offset = [&](int r) -> Offset {  // every lane of the warp takes part
    if constexpr (std::is_same_v<Offset, int32_t>) {
      return shfl_sync(0xffffffffu, off, r);
    } else {
      const uint32_t lo = uint32_t(uint64_t(off)), hi = uint32_t(uint64_t(off) >> 32);
      return int64_t((uint64_t(shfl_sync(0xffffffffu, hi, r)) << 32) |
                     shfl_sync(0xffffffffu, lo, r));
    }
  };
  // A segment without a source reads nothing (src-size 0) from the row base. (A kept int32_t
  // offset is >= 0: unsigned, the address is one IMAD.WIDE.U32, without a sign extension.)
  const auto source = [&](bool in, Offset o, int c) {
    if constexpr (std::is_same_v<Offset, int32_t>)
      return base + (in ? uint32_t(o + c) : 0u);
    else
      return base + (in ? o + c : int64_t(0));
  };
  if (32 % segs == 0 && kPerWarp * segs % 32 == 0) {
    // (the specialized head dims) Each lane copies one 16-byte column of every (32 / segs)-th row:
    // its column, its check and its place in the row stay put.
    const int step = 32 / segs, rl = lane / segs, c = (lane - rl * segs) * vec;
    const bool col_in = col0 + c < valid_cols;
    TM_UNROLL
    for (int k = 0; k < kPerWarp / step; ++k) {
      const int r = k * step + rl;
      const Offset o = row_offset(r);
      const bool in = col_in && o >= 0;
      cp_async_zfill<16>(dst + tile_offset(ld, row0 + r, c), source(in, o, c), in ? 16 : 0);
    }
    return;
  }
  for (int i0 = 0; i0 < kPerWarp * segs; i0 += 32) {  // the same trips for every lane
    const int i = i0 + lane;
    const int r = i / segs, c = (i - r * segs) * vec;
    const Offset o = row_offset(r < kPerWarp ? r : 0);
    const bool in = i < kPerWarp * segs && o >= 0 && col0 + c < valid_cols;
    if (i < kPerWarp * segs)
      cp_async_zfill<16>(dst + tile_offset(ld, row0 + r, c), source(in, o, c), in ? 16 : 0);
  }
}

// The same with the offsets given by src(r) (the offset of row r's column col0, or -1), called
// once per lane.
template <int kRows, class T, class Lay, class Src>
TM_DEVICE void copy_rows(shared_ptr<T> dst, Lay ld, int width, global_ptr<const T> base, int col0,
                         int valid_cols, Src&& src, int warp = int(warp_id())) {
  copy_rows_at<kRows>(dst, ld, width, base, col0, valid_cols, int64_t(src(warp_row<kRows>(warp))),
                      warp);
}

// Whether the 16-byte segments this thread copied with copy_rows<kRows>(dst, ld, width, ...) hold
// an inf or NaN in columns [col_lo, col_hi). It reads only the thread's own cp.async destinations,
// which are visible to it right after cp_async_wait_group, so it runs before the barrier that
// publishes the tile; block_any then combines the threads at that barrier.
template <int kRows, class E, class Lay>
TM_DEVICE bool copied_nonfinite(shared_ptr<typename E::T> dst, Lay ld, int width, int col_lo,
                                int col_hi, int warp = int(warp_id())) {
  constexpr int vec = kVec<typename E::T>, kPerWarp = kRows / kWarps;
  const int segs = width / vec, items = kPerWarp * segs, row0 = warp * kPerWarp;
  bool bad = false;
  for (int i = int(lane_id()); i < items; i += 32) {
    const int r = i / segs, c = (i - r * segs) * vec;
    if (c >= col_lo && c < col_hi)
      bad |= any_nonfinite<E>(load128(dst + tile_offset(ld, row0 + r, c)));
  }
  return bad;
}

// A block-wide OR taken at a barrier: block_any_vote before it (each warp votes, its lane 0 writes
// the warp's word), block_any_result after it. A set of words may be voted again only after
// another barrier has passed (every thread has read the last result), so the kernels give each
// vote that is not separated from the previous one by a barrier its own set (kBlockWarps words).
TM_DEVICE void block_any_vote(shared_ptr<int> words, bool pred) {
  const int any = any_sync(0xffffffffu, pred ? 1 : 0);
  if (lane_id() == 0) words[warp_id()] = any;
}
template <int kBlockWarps = kWarps>
TM_DEVICE bool block_any_result(shared_ptr<int> words) {
  int any = 0;
  for (int w = 0; w < kBlockWarps; ++w) any |= words[w];
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

}  // namespace tokenmix::cuda
