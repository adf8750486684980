// Tile schedule and element mask of generalized neighborhood attention.
//
// The attention engines work on query *strips*: up to `strip_len` consecutive
// queries along the last spatial dimension that share their dilation group and
// their coordinates in the leading dimensions. All queries of a strip therefore
// share the same window in the leading dimensions, so the keys a strip visits
// are a set of key *rows* (one per leading-dimension window position), each a
// contiguous run along the last dimension: the union of the strip's windows.
// The element mask inside a visited row is one interval per query.
//
// Host and device code use this header unchanged (the CPU engine now, the CUDA
// engine and the planner later).
#pragma once

#include <cstdint>

#include "tokenmix/window.h"

namespace tokenmix {

struct StripGeometry {
  int group[3];       // dilation group in each dimension
  int group_len[3];   // tokens of that group in each dimension
  int query[2];       // leading query coordinates (group coordinates)
  int first;          // first query along the last dimension (group coordinates)
  int count;          // queries in the strip
  int row_begin[2];   // key window in the leading dimensions: [begin, end)
  int row_end[2];
  int col_begin;      // union of the strip's windows along the last dimension
  int col_end;
};

struct NeighborhoodSchedule {
  WindowDim dims[3];
  int strip_len;
  int max_group_len[3];
  int strips_per_row;

  TM_HOST_DEVICE void init(const WindowDim* d, int strip) {
    for (int t = 0; t < 3; ++t) {
      dims[t] = d[t];
      max_group_len[t] = dilation_group_length(d[t].length, d[t].dilation, 0);
    }
    strip_len = strip;
    strips_per_row = (max_group_len[2] + strip - 1) / strip;
  }

  // Strips per (batch, head): dilation groups x leading coordinates x strips.
  // Some indices are empty (groups shorter than the longest one).
  TM_HOST_DEVICE int64_t strips_per_head() const {
    return int64_t(dims[0].dilation) * dims[1].dilation * dims[2].dilation * max_group_len[0] *
           max_group_len[1] * strips_per_row;
  }

  // Decodes a strip index; returns false for an empty index.
  TM_HOST_DEVICE bool decode(int64_t index, StripGeometry* g) const {
    const int strip = int(index % strips_per_row);
    index /= strips_per_row;
    const int q1 = int(index % max_group_len[1]);
    index /= max_group_len[1];
    const int q0 = int(index % max_group_len[0]);
    index /= max_group_len[0];
    g->group[2] = int(index % dims[2].dilation);
    index /= dims[2].dilation;
    g->group[1] = int(index % dims[1].dilation);
    index /= dims[1].dilation;
    g->group[0] = int(index);
    for (int t = 0; t < 3; ++t)
      g->group_len[t] = dilation_group_length(dims[t].length, dims[t].dilation, g->group[t]);
    if (q0 >= g->group_len[0] || q1 >= g->group_len[1]) return false;
    g->first = strip * strip_len;
    if (g->first >= g->group_len[2]) return false;
    g->count = g->group_len[2] - g->first < strip_len ? g->group_len[2] - g->first : strip_len;
    g->query[0] = q0;
    g->query[1] = q1;
    for (int t = 0; t < 2; ++t)
      window_range(g->query[t], g->group_len[t], dims[t].kernel, dims[t].stride, dims[t].causal,
                   &g->row_begin[t], &g->row_end[t]);
    window_union(g->first, g->first + g->count - 1, g->group_len[2], dims[2].kernel,
                 dims[2].stride, dims[2].causal, &g->col_begin, &g->col_end);
    return true;
  }

  // Element mask: query `i` of the strip keeps last-dimension keys [lo, hi).
  TM_HOST_DEVICE void query_interval(const StripGeometry& g, int i, int* lo, int* hi) const {
    window_range(g.first + i, g.group_len[2], dims[2].kernel, dims[2].stride, dims[2].causal, lo,
                 hi);
  }

  // Real coordinate of group coordinate `c` in dimension t.
  TM_HOST_DEVICE int real_coord(const StripGeometry& g, int t, int c) const {
    return g.group[t] + c * dims[t].dilation;
  }
};

}  // namespace tokenmix
