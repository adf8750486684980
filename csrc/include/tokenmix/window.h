// Neighborhood window rules, one spatial dimension at a time.
//
// This is the single definition of generalized neighborhood attention (GNA) used
// by every backend. It reproduces NATTEN 0.21: dilation splits a dimension into
// `dilation` interleaved groups and all window math happens in group
// coordinates; stride makes groups of `stride` consecutive queries share the
// window of their "leader"; windows are clamped at the borders (non-causal) or
// end at the query itself (causal). See docs/neighborhood_attention.md.
#pragma once

#include "tokenmix/host_device.h"

namespace tokenmix {

struct WindowDim {
  int length;    // input extent of this dimension
  int kernel;    // window size (>= 1; 1 only for padded dimensions)
  int stride;    // 1 <= stride <= kernel
  int dilation;  // >= 1
  bool causal;
};

// Number of tokens in dilation group `group` (0 <= group < dilation).
TM_HOST_DEVICE int dilation_group_length(int length, int dilation, int group) {
  return (length - group + dilation - 1) / dilation;
}

TM_HOST_DEVICE int window_left(int kernel) {
  return kernel / 2;
}
TM_HOST_DEVICE int window_right(int kernel) {
  return kernel / 2 + (kernel % 2) - 1;
}

// Keys [start, end) (group coordinates) seen by query `index` (group coordinates)
// in a dilation group of length `group_length`.
TM_HOST_DEVICE void window_range(int index, int group_length, int kernel, int stride, bool causal,
                                 int* start, int* end) {
  const int left = window_left(kernel);
  const int right = window_right(kernel);
  const int last = group_length - 1;
  if (causal) {
    int leader = (index / stride) * stride + stride - 1;
    leader = leader < last ? leader : last;
    const int s = leader - left - right;
    *start = s > 0 ? s : 0;
    *end = index + 1 < group_length ? index + 1 : group_length;
  } else {
    int leader = (index / stride) * stride + stride / 2;
    leader = leader < last ? leader : last;
    int s = leader - left;
    s = s > 0 ? s : 0;
    if (leader + right >= group_length) s += group_length - right - leader - 1;
    *start = s;
    *end = s + kernel;
  }
}

// Keys [start, end) covered by the windows of queries [first, last] (group
// coordinates). Both window ends are non-decreasing in the query index and
// consecutive windows overlap or touch, so the union is one interval.
TM_HOST_DEVICE void window_union(int first, int last, int group_length, int kernel, int stride,
                                 bool causal, int* start, int* end) {
  int s0, e0, s1, e1;
  window_range(first, group_length, kernel, stride, causal, &s0, &e0);
  window_range(last, group_length, kernel, stride, causal, &s1, &e1);
  *start = s0;
  *end = e1;
}

// Queries [start, end) (group coordinates) whose windows contain at least one of the keys
// [first, last]. Window starts and ends are non-decreasing in the query, so the queries that see
// one key form an interval whose ends are non-decreasing in the key: the union over the keys is
// [first query whose window ends after `first`, last query whose window starts at or before
// `last`]. Binary searches, O(log group_length). The backward visits query tiles through this.
TM_HOST_DEVICE void inverse_window_union(int first, int last, int group_length, int kernel,
                                         int stride, bool causal, int* start, int* end) {
  // The first query q whose window satisfies `past(window start, window end)`; the predicate
  // is monotone in q because both window ends are.
  auto first_query = [&](auto past) {
    int lo = 0, hi = group_length;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      int s, e;
      window_range(mid, group_length, kernel, stride, causal, &s, &e);
      if (past(s, e))
        hi = mid;
      else
        lo = mid + 1;
    }
    return lo;
  };
  *start = first_query([&](int, int e) { return e > first; });
  *end = first_query([&](int s, int) { return s > last; });
}

// Index into the relative-position-bias axis of this dimension (size 2k-1).
TM_HOST_DEVICE int rpb_offset(int key, int query, int kernel) {
  return key - query + kernel - 1;
}

}  // namespace tokenmix
