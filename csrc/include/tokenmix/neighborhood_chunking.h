// The pairs the CUDA neighborhood-attention forward kernels compute, per (batch, head), and the
// choice between the two forwards of compute capability 9.0 that follows from them. Host only:
// tokenmix.plan (na_plan_ops.cpp) reports these counts and the CUDA launcher (na_launch.h) makes
// the choice with the same functions, so the planner and the kernels agree.
//
// Two ways of computing a tile's key box, cut in SegmentedBox order into chunks of key_chunk keys:
// - warp groups (the mma.sync kernels): each warp owns kWarpRows consecutive rows of the tile and,
//   in a partial chunk, skips the groups of kGroupKeys keys that none of its rows keeps (a full
//   chunk, inside the inner box, is kept by every query and computed whole);
// - whole chunks (the sm_90a wgmma kernel): a wgmma spans all the tile's rows, so every chunk is
//   computed whole by the whole tile.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include "tokenmix/neighborhood_schedule.h"
#include "tokenmix/segmented_box.h"

namespace tokenmix {

// The mma.sync kernels' rows per warp and keys per skipped group (cuda/online_softmax.h
// kept_groups; na_launch.h checks them against the engine's constants).
constexpr int kChunkWarpRows = 16, kChunkGroupKeys = 16;
// Keys per chunk of the sm_90a kernel (its E::kKeys).
constexpr int kWgmmaKeyChunk = 64;

// Pair counts of one schedule; `overflow` is set when a count left int64 (the counts are then
// meaningless).
struct ChunkedPairs {
  int64_t tiles = 0;    // non-empty query tiles
  int64_t grouped = 0;  // warp groups (the mma.sync kernels), 0 unless asked for
  int64_t whole = 0;    // whole chunks (the sm_90a kernel)
  bool overflow = false;
};

namespace chunking_detail {

inline int64_t mul(int64_t a, int64_t b, bool* overflow) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) *overflow = true;
  return r;
}

inline int64_t add(int64_t a, int64_t b, bool* overflow) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) *overflow = true;
  return r;
}

}  // namespace chunking_detail

// Pairs of query tile g of `rows` rows (padding included) computed in whole chunks.
inline int64_t whole_chunk_pairs(const TileGeometry& g, int64_t rows, int64_t key_chunk,
                                 bool* overflow) {
  int64_t box = 1;
  for (int t = 0; t < 3; ++t)
    box = chunking_detail::mul(box, g.key_end[t] - g.key_begin[t], overflow);
  return chunking_detail::mul(rows, (box + key_chunk - 1) / key_chunk * key_chunk, overflow);
}

// Pairs of query tile g of `rows` rows computed in warp groups (key_chunk a multiple of
// kChunkGroupKeys): a key of the inner box is kept by every query, any other by the queries whose
// window holds it in every dimension; keys past the box and padding rows keep nothing.
// kChunkWarpRows x kChunkGroupKeys pairs per computed group. `scratch` holds the coordinates of
// the partial chunks' keys (reused from tile to tile).
inline int64_t warp_group_pairs(const NeighborhoodSchedule& sched, const TileGeometry& g,
                                int64_t rows, int64_t key_chunk, std::vector<int>& scratch,
                                bool* overflow) {
  constexpr int kRows = kChunkWarpRows, kKeys = kChunkGroupKeys;
  SegmentedBox box;
  tile_key_box(sched, g, &box);
  const int64_t volume = box.volume(), inner = box.inner();
  const int64_t full_chunks = inner / key_chunk;
  const int64_t chunks = (volume + key_chunk - 1) / key_chunk;
  const int64_t warps = (rows + kRows - 1) / kRows;
  const int nrows = g.count[0] * g.count[1] * g.count[2];
  int64_t groups = chunking_detail::mul(warps, full_chunks * (key_chunk / kKeys), overflow);
  const int64_t first_partial = full_chunks * key_chunk;
  scratch.resize(std::size_t(3 * (volume > first_partial ? volume - first_partial : 0)));
  for (int64_t k = first_partial; k < volume; ++k)
    box.coords(int(k), scratch.data() + 3 * (k - first_partial));
  for (int64_t w = 0; w < warps; ++w) {
    const int r0 = int(w * kRows);
    const int r1 = nrows < r0 + kRows ? nrows : r0 + kRows;
    if (r0 >= r1) continue;  // padding rows only: every element of a partial chunk is masked
    int lo[kRows][3], hi[kRows][3];
    for (int r = r0; r < r1; ++r) {
      int i[3];
      unravel_box(r, g.count, i);
      for (int t = 0; t < 3; ++t)
        sched.window(g, t, g.first[t] + i[t], &lo[r - r0][t], &hi[r - r0][t]);
    }
    auto kept_by_warp = [&](int64_t index) {
      if (index < inner) return true;
      const int* c = scratch.data() + 3 * (index - first_partial);
      for (int r = 0; r < r1 - r0; ++r) {
        bool in = true;
        for (int t = 0; t < 3; ++t) in = in && c[t] >= lo[r][t] && c[t] < hi[r][t];
        if (in) return true;
      }
      return false;
    };
    for (int64_t k0 = first_partial; k0 < chunks * key_chunk; k0 += kKeys) {
      bool kept = false;
      for (int64_t k = k0; k < k0 + kKeys && k < volume && !kept; ++k) kept = kept_by_warp(k);
      groups += kept ? 1 : 0;
    }
  }
  return chunking_detail::mul(groups, int64_t(kRows) * kKeys, overflow);
}

// Both counts over the schedule's tiles (`grouped` only when asked: it visits the partial chunks'
// keys, where the whole count is a product per tile). A tile's grouped count depends only on its
// windows relative to its key box (the counts and SegmentedBox are shift-invariant), and most
// tiles share those with others (every interior tile of a dimension has the same windows), so the
// count is computed once per distinct set of relative windows.
inline ChunkedPairs schedule_chunked_pairs(const NeighborhoodSchedule& sched, int64_t key_chunk,
                                           bool grouped) {
  ChunkedPairs out;
  const int64_t rows = int64_t(sched.tile[0]) * sched.tile[1] * sched.tile[2];
  std::vector<int> scratch, shape;
  std::map<std::vector<int>, int64_t> seen;  // relative windows -> grouped pairs
  TileGeometry g;
  const int64_t candidates = sched.tiles_per_head();
  for (int64_t index = 0; index < candidates && !out.overflow; ++index) {
    if (!sched.decode(index, &g)) continue;  // past the end of a shorter dilation group
    ++out.tiles;
    out.whole = chunking_detail::add(
        out.whole, whole_chunk_pairs(g, rows, key_chunk, &out.overflow), &out.overflow);
    if (!grouped) continue;
    shape.clear();
    for (int t = 0; t < 3; ++t) {
      shape.push_back(g.count[t]);
      shape.push_back(g.key_end[t] - g.key_begin[t]);
      for (int i = 0; i < g.count[t]; ++i) {
        int lo, hi;
        sched.window(g, t, g.first[t] + i, &lo, &hi);
        shape.push_back(lo - g.key_begin[t]);
        shape.push_back(hi - g.key_begin[t]);
      }
    }
    auto it = seen.find(shape);
    if (it == seen.end())
      it = seen.emplace(shape, warp_group_pairs(sched, g, rows, key_chunk, scratch, &out.overflow))
               .first;
    out.grouped = chunking_detail::add(out.grouped, it->second, &out.overflow);
  }
  return out;
}

// The choice on compute capability 9.0 (fp16/bf16, D = Dv in {32, 64, 128}, 64-key chunks): the
// wgmma kernel computes whole chunks at a lower cost per chunk than the mma.sync kernels, which
// compute fewer pairs (warp groups). It is taken when
//     grouped pairs >= wgmma_break_even(D) x whole pairs.
// wgmma_chunk_cost(D) is the wgmma kernel's cost per 64-key chunk over the mma.sync kernel's in
// the static SASS model (python -m tokenmix sass-report: the fp16 forward's sm_90 bound over the
// sm_90a kernel's bound; both have the same tensor cycles per chunk). The break-even divides it by
// kWgmmaModelMargin: the model ignores latency, and the wgmma kernel waits for each warpgroup
// product where four mma.sync warps overlap theirs, so the wgmma kernel must win by that margin
// in the model. At D = 32 the two costs are within the margin, and auto never takes the wgmma
// kernel. tests/test_sass_report.py checks the costs against the shipped kernels.
constexpr double kWgmmaModelMargin = 0.8;

inline double wgmma_chunk_cost(int head_dim) {
  switch (head_dim) {
    case 32: return 0.81;    // 23.9% / 29.7%
    case 64: return 0.65;    // 34.8% / 53.9%
    case 128: return 0.48;   // 35.5% / 74.4%
    default: return 1.0e30;  // no wgmma instantiation
  }
}

inline double wgmma_break_even(int head_dim) {
  return wgmma_chunk_cost(head_dim) / kWgmmaModelMargin;
}

// Whether the wgmma (whole-chunk) forward pays for a problem with these pair counts and head dim.
inline bool whole_chunks_pay(const ChunkedPairs& c, int head_dim) {
  if (c.overflow || c.whole <= 0) return false;
  return double(c.grouped) >= wgmma_break_even(head_dim) * double(c.whole);
}

}  // namespace tokenmix
