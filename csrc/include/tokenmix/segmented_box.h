// The order in which the CUDA neighborhood kernels visit a query tile's key box (and a key tile's
// query box), shared with the planner so that its pair accounting follows the kernels' chunks.
#pragma once

#include "tokenmix/neighborhood_schedule.h"

namespace tokenmix {

// Coordinates of element `index` of a box with extents e (last dimension fastest). Both are
// non-negative: unsigned division is shorter on the GPU (no sign fix-ups).
TM_HOST_DEVICE void unravel_box(int index, const int* e, int* c) {
  const unsigned e1 = unsigned(e[1]), e2 = unsigned(e[2]);
  const unsigned rest = unsigned(index) / e2;
  c[2] = int(unsigned(index) - rest * e2);
  c[1] = int(rest % e1);
  c[0] = int(rest / e1);
}

// n / d for 0 <= n < 2^31 by a multiply-high, an add and a shift (Granlund and Montgomery): with
// l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1 < 2^32, (umulhi(n, m) + n) >> l is exact,
// and the sum is below 2n < 2^32. Set up once, it replaces the ~16 instructions of a GPU
// division.
struct FastDivisor {
  uint32_t m, l;
  TM_HOST_DEVICE void init(uint32_t d) {  // d >= 1
    l = 0;
    while ((uint64_t(1) << l) < d) ++l;
    m = uint32_t((uint64_t(1) << 32) * ((uint64_t(1) << l) - d) / d + 1);
  }
  TM_HOST_DEVICE uint32_t divide(uint32_t n) const {
    return (uint32_t((uint64_t(n) * m) >> 32) + n) >> l;
  }
};

// A box [b, e) with an inner box [il, ih) (empty: il = ih = b in every dimension), enumerated
// inner box first, then the six slabs around it (below and above it in dimension 0, then in 1
// within its dimension-0 range, then in 2). The chunks of the inner box's keys are full chunks
// (every query of the tile keeps them) even where the box has more than one dimension, which a
// plain row-major order of the box would mix with the keys around them.
struct SegmentedBox {
  int b[3], e[3], il[3], ih[3];
  FastDivisor inner_div[2];  // by the inner box's extents in dimensions 1 and 2 (coords)

  TM_HOST_DEVICE void init(const int* begin, const int* end, const int* inner_lo,
                           const int* inner_hi) {
    bool empty = false;
    TM_HD_UNROLL
    for (int t = 0; t < 3; ++t) {
      b[t] = begin[t];
      e[t] = end[t];
      il[t] = inner_lo[t] > begin[t] ? inner_lo[t] : begin[t];
      ih[t] = inner_hi[t] < end[t] ? inner_hi[t] : end[t];
      empty = empty || il[t] >= ih[t];
    }
    if (empty) {
      TM_HD_UNROLL
      for (int t = 0; t < 3; ++t) il[t] = ih[t] = b[t];
    }
    inner_div[0].init(uint32_t(empty ? 1 : ih[1] - il[1]));
    inner_div[1].init(uint32_t(empty ? 1 : ih[2] - il[2]));
  }
  TM_HOST_DEVICE int volume() const { return (e[0] - b[0]) * (e[1] - b[1]) * (e[2] - b[2]); }
  TM_HOST_DEVICE int inner() const { return (ih[0] - il[0]) * (ih[1] - il[1]) * (ih[2] - il[2]); }

  // The segments in order: per dimension [lo, hi).
  TM_HOST_DEVICE void segment(int s, int* lo, int* hi) const {
    TM_HD_UNROLL
    for (int t = 0; t < 3; ++t) {
      // dimensions before the slab's own keep the inner range, those after it the whole box
      const int own = s == 0 ? 3 : (s - 1) / 2;
      lo[t] = t < own ? il[t] : b[t];
      hi[t] = t < own ? ih[t] : e[t];
      if (t == own) {
        lo[t] = (s & 1) ? b[t] : ih[t];
        hi[t] = (s & 1) ? il[t] : e[t];
      }
    }
  }
  // Coordinates c of element `index` (< volume()). The inner box's elements (every key of a full
  // chunk) divide by inner_div; the slabs around it by their extents.
  TM_HOST_DEVICE void coords(int index, int* c) const {
    const int inner_volume = inner();
    if (index < inner_volume) {
      const uint32_t rest = inner_div[1].divide(uint32_t(index));
      const uint32_t c0 = inner_div[0].divide(rest);
      c[2] = il[2] + int(uint32_t(index) - rest * uint32_t(ih[2] - il[2]));
      c[1] = il[1] + int(rest - c0 * uint32_t(ih[1] - il[1]));
      c[0] = il[0] + int(c0);
      return;
    }
    index -= inner_volume;
    TM_HD_UNROLL
    for (int s = 1; s < 7; ++s) {
      int lo[3], hi[3];
      segment(s, lo, hi);
      const int ext[3] = {hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]};
      const int vol = ext[0] * ext[1] * ext[2];
      if (index < vol || s == 6) {
        unravel_box(index, ext, c);
        TM_HD_UNROLL
        for (int t = 0; t < 3; ++t) c[t] += lo[t];
        return;
      }
      index -= vol;
    }
  }
  // The index of coordinates c (inside the box).
  TM_HOST_DEVICE int index_of(const int* c) const {
    int base = 0;
    TM_HD_UNROLL
    for (int s = 0; s < 7; ++s) {
      int lo[3], hi[3];
      segment(s, lo, hi);
      const int ext[3] = {hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]};
      bool in = true;
      TM_HD_UNROLL
      for (int t = 0; t < 3; ++t) in = in && c[t] >= lo[t] && c[t] < hi[t];
      if (in) return base + ((c[0] - lo[0]) * ext[1] + c[1] - lo[1]) * ext[2] + c[2] - lo[2];
      base += ext[0] * ext[1] * ext[2];
    }
    return -1;
  }
};

// The key box of query tile g, its inner box being the keys every query of the tile sees: window
// starts and ends are monotone in the query, so those run from the last query's start to the first
// query's end in every dimension.
TM_HOST_DEVICE void tile_key_box(const NeighborhoodSchedule& sched, const TileGeometry& g,
                                 SegmentedBox* box) {
  int lo_last[3], hi_first[3];
  TM_HD_UNROLL
  for (int t = 0; t < 3; ++t) {
    int lo, hi;
    sched.window(g, t, g.first[t] + g.count[t] - 1, &lo_last[t], &hi);
    sched.window(g, t, g.first[t], &lo, &hi_first[t]);
  }
  box->init(g.key_begin, g.key_end, lo_last, hi_first);
}

}  // namespace tokenmix
