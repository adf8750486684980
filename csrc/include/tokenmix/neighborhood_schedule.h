// Tile schedule and element mask of generalized neighborhood attention.
//
// Queries are processed in *tiles*: boxes of up to tile[0] x tile[1] x tile[2]
// queries of one dilation group (multi-dimensional tiling, as in the GNA
// paper). Because window ends are monotone in the query coordinate, the keys
// a tile can see form one box as well: per dimension, the union of the
// windows of the tile's first and last query. The engines visit that key box
// and apply the element mask: key (r0, r1, r2) is kept for query (q0, q1, q2)
// when r_t lies in the window of q_t in every dimension t.
//
// Host and device code use this header unchanged (the CPU engine now, the CUDA
// engine and the planner later).
#pragma once

#include <cstdint>

#include "tokenmix/window.h"

namespace tokenmix {

struct TileGeometry {
  int group[3];      // dilation group in each dimension
  int group_len[3];  // tokens of that group in each dimension
  int first[3];      // first query of the tile (group coordinates)
  int count[3];      // queries of the tile in each dimension
  int key_begin[3];  // key box visited by the tile: [begin, end)
  int key_end[3];
};

struct NeighborhoodSchedule {
  WindowDim dims[3];
  int tile[3];
  int max_group_len[3];
  int tiles_per_dim[3];

  TM_HOST_DEVICE void init(const WindowDim* d, const int* tile_shape) {
    for (int t = 0; t < 3; ++t) {
      dims[t] = d[t];
      tile[t] = tile_shape[t];
      max_group_len[t] = dilation_group_length(d[t].length, d[t].dilation, 0);
      tiles_per_dim[t] = (max_group_len[t] + tile[t] - 1) / tile[t];
    }
  }

  // Tiles per (batch, head): dilation groups x tiles of the longest group.
  // Indices past a shorter group's end decode as empty.
  TM_HOST_DEVICE int64_t tiles_per_head() const {
    return int64_t(dims[0].dilation) * dims[1].dilation * dims[2].dilation * tiles_per_dim[0] *
           tiles_per_dim[1] * tiles_per_dim[2];
  }

  TM_HOST_DEVICE bool decode(int64_t index, TileGeometry* g) const {
    int tix[3];
    for (int t = 2; t >= 0; --t) {
      tix[t] = int(index % tiles_per_dim[t]);
      index /= tiles_per_dim[t];
    }
    for (int t = 2; t >= 0; --t) {
      g->group[t] = int(index % dims[t].dilation);
      index /= dims[t].dilation;
    }
    for (int t = 0; t < 3; ++t) {
      g->group_len[t] = dilation_group_length(dims[t].length, dims[t].dilation, g->group[t]);
      g->first[t] = tix[t] * tile[t];
      if (g->first[t] >= g->group_len[t]) return false;
      const int left = g->group_len[t] - g->first[t];
      g->count[t] = left < tile[t] ? left : tile[t];
      window_union(g->first[t], g->first[t] + g->count[t] - 1, g->group_len[t], dims[t].kernel,
                   dims[t].stride, dims[t].causal, &g->key_begin[t], &g->key_end[t]);
    }
    return true;
  }

  // Window [lo, hi) of query coordinate q (group coordinates) in dimension t.
  TM_HOST_DEVICE void window(const TileGeometry& g, int t, int q, int* lo, int* hi) const {
    window_range(q, g.group_len[t], dims[t].kernel, dims[t].stride, dims[t].causal, lo, hi);
  }

  // Real coordinate of group coordinate c in dimension t.
  TM_HOST_DEVICE int real_coord(const TileGeometry& g, int t, int c) const {
    return g.group[t] + c * dims[t].dilation;
  }
};

// Keys visited per query by a tile shape in the interior of a large input:
// prod_t (kernel_t + tile_t - 1). Used to pick tile shapes.
TM_HOST_DEVICE int64_t interior_keys_per_tile(const WindowDim* d, const int* tile_shape) {
  int64_t keys = 1;
  for (int t = 0; t < 3; ++t) {
    int span = d[t].kernel + tile_shape[t] - 1;
    const int glen = dilation_group_length(d[t].length, d[t].dilation, 0);
    if (span > glen) span = glen;
    keys *= span;
  }
  return keys;
}

// Query-key pairs a tile shape computes along dimension t, summed over the dilation groups and
// tiles of that dimension: sum of (tile rows, padding included) x (keys the tile's box spans).
// Pairs of the whole problem per (batch, head) are the product over dimensions, because tiles and
// key boxes are products of per-dimension ranges.
TM_HOST_DEVICE int64_t tile_pairs_along(const WindowDim& d, int tile) {
  int64_t pairs = 0;
  for (int g = 0; g < d.dilation; ++g) {
    const int n = dilation_group_length(d.length, d.dilation, g);
    for (int first = 0; first < n; first += tile) {
      const int last = first + tile - 1 < n - 1 ? first + tile - 1 : n - 1;
      int s, e;
      window_union(first, last, n, d.kernel, d.stride, d.causal, &s, &e);
      pairs += int64_t(tile) * (e - s);
    }
  }
  return pairs;
}

// Query-key pairs inside the windows along dimension t (the useful work), summed over groups.
TM_HOST_DEVICE int64_t window_pairs_along(const WindowDim& d) {
  int64_t pairs = 0;
  for (int g = 0; g < d.dilation; ++g) {
    const int n = dilation_group_length(d.length, d.dilation, g);
    for (int q = 0; q < n; ++q) {
      int s, e;
      window_range(q, n, d.kernel, d.stride, d.causal, &s, &e);
      pairs += e - s;
    }
  }
  return pairs;
}

// The query tile shape with `volume` queries (a power of two in each dimension, volume a power of
// two) that computes the fewest query-key pairs for this problem; ties go to the shape listed
// first (the longest last dimension, the most contiguous memory). The kernels launch with it and
// tokenmix.plan reports it.
TM_HOST_DEVICE void choose_tile_shape(const WindowDim* d, int volume, int* tile) {
  int64_t best = -1;
  tile[0] = 1;
  tile[1] = 1;
  tile[2] = volume;
  for (int t0 = 1; t0 <= volume; t0 *= 2) {
    if (t0 > 1 && d[0].length == 1) break;
    for (int t1 = 1; t0 * t1 <= volume; t1 *= 2) {
      if (t1 > 1 && d[1].length == 1) break;
      const int t2 = volume / (t0 * t1);
      const int64_t pairs =
          tile_pairs_along(d[0], t0) * tile_pairs_along(d[1], t1) * tile_pairs_along(d[2], t2);
      if (best < 0 || pairs < best) {
        best = pairs;
        tile[0] = t0;
        tile[1] = t1;
        tile[2] = t2;
      }
    }
  }
}

}  // namespace tokenmix
