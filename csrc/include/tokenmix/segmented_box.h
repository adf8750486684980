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

// A box [b, e) with an inner box [il, ih) (empty: il = ih = b in every dimension), enumerated
// inner box first, then the six slabs around it (below and above it in dimension 0, then in 1
// within its dimension-0 range, then in 2). The chunks of the inner box's keys are full chunks
// (every query of the tile keeps them) even where the box has more than one dimension, which a
// plain row-major order of the box would mix with the keys around them.
struct SegmentedBox {
  int b[3], e[3], il[3], ih[3];

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
  // Coordinates c of element `index` (< volume()).
  TM_HOST_DEVICE void coords(int index, int* c) const {
    TM_HD_UNROLL
    for (int s = 0; s < 7; ++s) {
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
