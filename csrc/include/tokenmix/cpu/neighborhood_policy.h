// The policy of the CPU attention engine for generalized neighborhood
// attention: query tiles are boxes of one dilation group (tile schedule of
// neighborhood_schedule.h), a tile's chunks walk its key box row by row, the
// element rule is "key inside the query's window in every dimension", the rpb
// is its additive bias and the additional tokens are extra chunks every lane
// keeps.
#pragma once

#include <cstdint>

#include "tokenmix/attention_problem.h"
#include "tokenmix/cpu/attention_engine.h"
#include "tokenmix/neighborhood_schedule.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

// Picks the query tile: the box whose lanes (tile queries x heads per kv head)
// fill one vector and that visits the fewest keys per lane.
inline void choose_tile(const NeighborhoodProblem& p, int group_heads, int width, int* tile) {
  const int max_queries = group_heads >= width ? 1 : width / group_heads;
  double best = 1e300;
  tile[0] = tile[1] = tile[2] = 1;
  int glen[3];
  for (int t = 0; t < 3; ++t)
    glen[t] = dilation_group_length(p.dims[t].length, p.dims[t].dilation, 0);
  for (int a = 1; a <= max_queries && a <= glen[0]; a *= 2)
    for (int b = 1; a * b <= max_queries && b <= glen[1]; b *= 2)
      for (int c = 1; a * b * c <= max_queries; c *= 2) {
        if (c > glen[2] && c > 1) break;
        const int cand[3] = {a, b, c};
        const int queries = a * b * c;
        const int lanes = round_up(queries * group_heads, width);
        const double cost =
            double(interior_keys_per_tile(p.dims, cand)) * lanes / (queries * group_heads);
        if (cost < best * (1 - 1e-9)) {
          best = cost;
          tile[0] = a;
          tile[1] = b;
          tile[2] = c;
        }
      }
}

// Keys and values as rows of T with unit feature stride. Either the caller's
// tensor (same dtype, rows already readable as vectors) or a converted copy
// [B, H_kv, tokens + extra, padded dim].
template <class T>
struct NeighborhoodRows {
  const T* base = nullptr;
  int64_t stride[6] = {0, 0, 0, 0, 0, 1};  // when reading the caller's tensor
  const T* converted = nullptr;            // when converted
  int64_t padded = 0, rows = 0;

  const T* row(const NeighborhoodProblem& p, int64_t b, int64_t hk, int64_t tok, int x0, int x1,
               int x2) const {
    if (converted) return converted + ((b * p.kv_heads + hk) * rows + tok) * padded;
    return base + b * stride[0] + x0 * stride[1] + x1 * stride[2] + x2 * stride[3] + hk * stride[4];
  }
  const T* extra_row(int64_t b, int64_t hk, int64_t tokens, int64_t n,
                     const NeighborhoodProblem& p) const {
    return converted + ((b * p.kv_heads + hk) * rows + tokens + n) * padded;
  }
};

template <class In, class T>
void convert_neighborhood_rows(const NeighborhoodProblem& p, const StridedView& main,
                               const StridedView& extra, int dim, int padded, Buffer<T>& out) {
  const int64_t tokens = p.tokens(), rows = tokens + p.num_extra;
  out.assign(size_t(p.batch * p.kv_heads * rows * padded), T(0));
  T* dst = out.data();
  const int64_t l1 = p.dims[1].length, l2 = p.dims[2].length;
  run_parallel(p, p.batch * p.kv_heads * rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t tok = idx % rows, bh = idx / rows;
      const int64_t b = bh / p.kv_heads, hk = bh % p.kv_heads;
      const In* src;
      if (tok < tokens) {
        const int64_t x2 = tok % l2, x1 = (tok / l2) % l1, x0 = tok / (l2 * l1);
        src = static_cast<const In*>(main.data) + b * main.stride[0] + x0 * main.stride[1] +
              x1 * main.stride[2] + x2 * main.stride[3] + hk * main.stride[4];
      } else {
        src = static_cast<const In*>(extra.data) + b * extra.stride[0] +
              (tok - tokens) * extra.stride[3] + hk * extra.stride[4];
      }
      T* row = dst + idx * padded;
      for (int d = 0; d < dim; ++d) row[d] = T(to_float(src[d]));
    }
  });
}

// Where a backward tile adds the dK and dV rows of its (batch, kv head): spatial token t at
// k + t * k_ld (v + t * v_ld), additional token e at ek + e * e_ldk (ev + e * e_ldv); the rpb
// gradient of the group's heads at rpb ([group heads, rpb size], or null without rpb).
template <class T>
struct NeighborhoodGrads {
  T *k = nullptr, *v = nullptr, *ek = nullptr, *ev = nullptr;
  int64_t k_ld = 0, v_ld = 0, e_ldk = 0, e_ldv = 0;
  T* rpb = nullptr;
};

struct NeighborhoodTile {
  int64_t b = 0, hk = 0;
  TileGeometry g;
};

template <class InT, class TT>
struct NeighborhoodPolicy {
  using In = InT;
  using T = TT;
  using Tile = NeighborhoodTile;
  using GradTarget = NeighborhoodGrads<T>;
  using V = typename Simd<T>::V;
  using VI = typename Simd<T>::VI;
  using I = typename Simd<T>::I;
  static constexpr int W = Simd<T>::kWidth;
  static constexpr int kChunk = 128;  // keys per chunk

  struct Lanes : LaneTable<T> {
    Buffer<I> lo[3], hi[3];  // window per dimension, per lane
    Buffer<int> q[3];        // query group coordinates per lane
    Buffer<int> x[3];        // query real coordinates per lane
  };

  struct Chunk : ChunkRows<T> {
    Buffer<int> col, row_id;  // last-dim group coordinate, index into row masks
    Buffer<int> r0, r1;       // leading key coordinates of each row id
    Buffer<I> row_mask;       // [rows x lanes]: lane sees this key row
    int rows = 0;
    bool extra = false;
  };

  const NeighborhoodProblem& p;
  AttentionTensors io;
  NeighborhoodSchedule sched;
  int group_heads, tile_shape[3], tile_queries, L;  // lanes padded to W
  int dp, dvp;
  int rpb_dims[3];
  NeighborhoodRows<T> keys, values;
  Buffer<T> key_copy, value_copy;
  // Window [lo, hi) of every (dilation group, group coordinate) per dimension.
  Buffer<int> win_lo[3], win_hi[3];

  NeighborhoodPolicy(const NeighborhoodProblem& prob, bool backward) : p(prob) {
    group_heads = int(p.heads / p.kv_heads);
    choose_tile(p, group_heads, W, tile_shape);
    sched.init(p.dims, tile_shape);
    tile_queries = tile_shape[0] * tile_shape[1] * tile_shape[2];
    L = round_up(tile_queries * group_heads, W);
    const int D = int(p.head_dim), Dv = int(p.value_dim);
    dp = round_up(D, W);
    dvp = round_up(Dv, W);
    for (int t = 0; t < 3; ++t) rpb_dims[t] = 2 * p.dims[t].kernel - 1;
    io = attention_tensors(p);
    for (int t = 0; t < 3; ++t) {
      const WindowDim& wd = p.dims[t];
      const int64_t n = int64_t(wd.dilation) * sched.max_group_len[t];
      win_lo[t].assign(size_t(n), 0);
      win_hi[t].assign(size_t(n), 0);
      for (int grp = 0; grp < wd.dilation; ++grp) {
        const int glen = dilation_group_length(wd.length, wd.dilation, grp);
        for (int c = 0; c < glen; ++c)
          window_range(c, glen, wd.kernel, wd.stride, wd.causal,
                       &win_lo[t][size_t(grp) * sched.max_group_len[t] + c],
                       &win_hi[t][size_t(grp) * sched.max_group_len[t] + c]);
      }
    }
    // Read K/V in place when they are T already and rows can be loaded as
    // whole vectors; otherwise convert once. The backward reads key rows as
    // vectors (dQ = dS K) so it needs padded rows too.
    const bool same =
        sizeof(In) == sizeof(T) && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16;
    const bool has_extra = p.num_extra > 0;
    if (same && !has_extra && (!backward || D % W == 0)) {
      keys.base = static_cast<const T*>(p.k.data);
      for (int i = 0; i < 6; ++i) keys.stride[i] = p.k.stride[i];
    } else {
      convert_neighborhood_rows<In, T>(p, p.k, p.extra_k, D, dp, key_copy);
      keys.converted = key_copy.data();
      keys.padded = dp;
      keys.rows = p.tokens() + p.num_extra;
    }
    if (same && !has_extra && Dv % W == 0) {
      values.base = static_cast<const T*>(p.v.data);
      for (int i = 0; i < 6; ++i) values.stride[i] = p.v.stride[i];
    } else {
      convert_neighborhood_rows<In, T>(p, p.v, p.extra_v, Dv, dvp, value_copy);
      values.converted = value_copy.data();
      values.padded = dvp;
      values.rows = p.tokens() + p.num_extra;
    }
  }

  const NeighborhoodProblem& problem() const { return p; }
  const AttentionTensors& tensors() const { return io; }
  int lanes() const { return L; }

  int64_t num_tiles() const { return p.batch * p.kv_heads * sched.tiles_per_head(); }
  bool tile(int64_t index, Tile* t) const {
    const int64_t per_head = sched.tiles_per_head(), bh = index / per_head;
    t->b = bh / p.kv_heads;
    t->hk = bh % p.kv_heads;
    return sched.decode(index % per_head, &t->g);
  }

  void init_lanes(Lanes& ln) const {
    ln.init(L);
    for (int t = 0; t < 3; ++t) {
      ln.lo[t].assign(L, 0);
      ln.hi[t].assign(L, 0);
      ln.q[t].assign(L, 0);
      ln.x[t].assign(L, 0);
    }
  }

  void init_chunk(Chunk& ch, bool backward) const {
    ch.init(kChunk, backward);
    ch.col.assign(kChunk, 0);
    ch.row_id.assign(kChunk, 0);
    ch.r0.assign(kChunk, 0);
    ch.r1.assign(kChunk, 0);
    ch.row_mask.assign(size_t(kChunk) * L, 0);
  }

  // Element offset of a query row in a [B, S.., H, D] view.
  static int64_t offset(const StridedView& view, int64_t b, int x0, int x1, int x2, int h) {
    return b * view.stride[0] + x0 * view.stride[1] + x1 * view.stride[2] + x2 * view.stride[3] +
           h * view.stride[4];
  }

  // Fills the lane table of a tile (window bounds come from the precomputed
  // per-dimension tables: no divisions per lane).
  void setup_lanes(const Tile& tile, Lanes& ln) const {
    const TileGeometry& g = tile.g;
    for (int l = 0; l < L; ++l) {
      ln.head[l] = -1;
      for (int t = 0; t < 3; ++t) ln.lo[t][l] = ln.hi[t][l] = 0;  // sees nothing
    }
    const int* lo_t[3];
    const int* hi_t[3];
    for (int t = 0; t < 3; ++t) {
      lo_t[t] = win_lo[t].data() + int64_t(g.group[t]) * sched.max_group_len[t];
      hi_t[t] = win_hi[t].data() + int64_t(g.group[t]) * sched.max_group_len[t];
    }
    const int64_t l1 = p.dims[1].length, l2 = p.dims[2].length, b = tile.b;
    for (int hg = 0; hg < group_heads; ++hg)
      for (int i0 = 0; i0 < g.count[0]; ++i0)
        for (int i1 = 0; i1 < g.count[1]; ++i1)
          for (int i2 = 0; i2 < g.count[2]; ++i2) {
            const int l = hg * tile_queries + (i0 * tile_shape[1] + i1) * tile_shape[2] + i2;
            const int qc[3] = {g.first[0] + i0, g.first[1] + i1, g.first[2] + i2};
            const int h = int(tile.hk * group_heads + hg);
            ln.head[l] = h;
            int x[3];
            for (int t = 0; t < 3; ++t) {
              ln.lo[t][l] = I(lo_t[t][qc[t]]);
              ln.hi[t][l] = I(hi_t[t][qc[t]]);
              ln.q[t][l] = qc[t];
              x[t] = ln.x[t][l] = sched.real_coord(g, t, qc[t]);
            }
            const int64_t token = (int64_t(x[0]) * l1 + x[1]) * l2 + x[2];
            ln.q_off[l] = offset(p.q, b, x[0], x[1], x[2], h);
            ln.out_off[l] = offset(p.out, b, x[0], x[1], x[2], h);
            ln.grad_out_off[l] = offset(p.grad_out, b, x[0], x[1], x[2], h);
            ln.grad_q_off[l] = offset(p.grad_q, b, x[0], x[1], x[2], h);
            ln.lse_off[l] = (b * p.tokens() + token) * p.heads + h;
          }
  }

  // Calls fn(chunk) for each chunk of keys of the tile's key box (rows that no
  // lane can see are skipped, and each row is cut to the columns some lane
  // sees), then for each chunk of additional tokens. A chunk is full when
  // every active lane sees each of its columns and there is no rpb (the
  // interior of the window). With a target (backward) it also gives the
  // gradient row of each key.
  template <class Fn>
  void for_each_chunk(const Tile& tile, const Lanes& ln, Chunk& ch, const GradTarget* acc,
                      Fn&& fn) const {
    const TileGeometry& g = tile.g;
    const int64_t b = tile.b, hk = tile.hk;
    const int64_t l1 = p.dims[1].length, l2 = p.dims[2].length;
    const int64_t tokens = p.tokens();
    const bool can_be_full = p.rpb == nullptr;
    auto emit = [&] { fn(ch); };
    auto column = [&](int j, int64_t tok) {
      if (acc) {
        ch.gk[j] = tok < tokens ? acc->k + tok * acc->k_ld : acc->ek + (tok - tokens) * acc->e_ldk;
        ch.gv[j] = tok < tokens ? acc->v + tok * acc->v_ld : acc->ev + (tok - tokens) * acc->e_ldv;
      }
    };
    ch.n = 0;
    ch.rows = 0;
    ch.extra = false;
    ch.full = can_be_full;
    for (int r0 = g.key_begin[0]; r0 < g.key_end[0]; ++r0) {
      for (int r1 = g.key_begin[1]; r1 < g.key_end[1]; ++r1) {
        // A full chunk is flushed before a new row takes a slot: every row
        // holds at least one column, so rows <= columns < kChunk here.
        if (ch.n == kChunk) {
          emit();
          ch.n = 0;
          ch.rows = 0;
          ch.full = can_be_full;
        }
        I* rm = ch.row_mask.data() + int64_t(ch.rows) * L;
        int cmin = g.key_end[2], cmax = g.key_begin[2];
        // Columns [all_lo, all_hi) of this row are seen by every active lane.
        int all_lo = g.key_begin[2], all_hi = g.key_end[2];
        bool all_rows = true;
        for (int l = 0; l < L; ++l) {
          if (ln.head[l] < 0) {
            rm[l] = I(0);
            continue;
          }
          const bool see =
              r0 >= ln.lo[0][l] && r0 < ln.hi[0][l] && r1 >= ln.lo[1][l] && r1 < ln.hi[1][l];
          rm[l] = see ? I(-1) : I(0);
          all_rows &= see;
          if (see) {
            cmin = min_of<int>(cmin, int(ln.lo[2][l]));
            cmax = max_of<int>(cmax, int(ln.hi[2][l]));
          }
          all_lo = max_of<int>(all_lo, int(ln.lo[2][l]));
          all_hi = min_of<int>(all_hi, int(ln.hi[2][l]));
        }
        if (cmin >= cmax) continue;
        if (!all_rows) all_hi = all_lo;  // no column of this row is interior
        int rid = ch.rows++;
        ch.r0[rid] = r0;
        ch.r1[rid] = r1;
        const int x0 = sched.real_coord(g, 0, r0), x1 = sched.real_coord(g, 1, r1);
        for (int c = cmin; c < cmax; ++c) {
          if (ch.n == kChunk) {
            emit();
            // The current row continues in the next chunk as its row 0.
            for (int l = 0; l < L; ++l) ch.row_mask[l] = ch.row_mask[int64_t(rid) * L + l];
            ch.r0[0] = r0;
            ch.r1[0] = r1;
            ch.n = 0;
            ch.rows = 1;
            ch.full = can_be_full;
            rid = 0;
          }
          const int j = ch.n++;
          ch.full = ch.full && c >= all_lo && c < all_hi;
          const int x2 = sched.real_coord(g, 2, c);
          const int64_t tok = (int64_t(x0) * l1 + x1) * l2 + x2;
          ch.krow[j] = keys.row(p, b, hk, tok, x0, x1, x2);
          ch.vrow[j] = values.row(p, b, hk, tok, x0, x1, x2);
          ch.col[j] = c;
          ch.row_id[j] = rid;
          column(j, tok);
        }
      }
    }
    if (ch.n > 0) emit();
    if (p.num_extra == 0) return;
    // Every lane sees the additional tokens, and the rpb does not apply to them.
    ch.extra = true;
    ch.full = true;
    ch.rows = 1;
    for (int l = 0; l < L; ++l) ch.row_mask[l] = ln.head[l] >= 0 ? I(-1) : I(0);
    for (int64_t e0 = 0; e0 < p.num_extra; e0 += kChunk) {
      ch.n = int(min_of<int64_t>(kChunk, p.num_extra - e0));
      for (int j = 0; j < ch.n; ++j) {
        ch.krow[j] = keys.extra_row(b, hk, tokens, e0 + j, p);
        ch.vrow[j] = values.extra_row(b, hk, tokens, e0 + j, p);
        ch.col[j] = 0;
        ch.row_id[j] = 0;
        column(j, tokens + e0 + j);
      }
      emit();
    }
  }

  // The window rule for one element (partial chunks).
  bool keeps(const Chunk& ch, const Lanes& ln, int j, int l) const {
    if (!ch.row_mask[int64_t(ch.row_id[j]) * L + l]) return false;
    return ch.extra || (ch.col[j] >= ln.lo[2][l] && ch.col[j] < ln.hi[2][l]);
  }

  // The window mask of column j for lanes [v, v + W): -1 where the lane sees the key.
  VI keep(const Chunk& ch, const Lanes& ln, int j, int v) const {
    const VI row = vload<VI>(ch.row_mask.data() + int64_t(ch.row_id[j]) * L + v);
    if (ch.extra) return row;
    const VI c = vbroadcast<VI>(I(ch.col[j]));
    return row & (c >= vload<VI>(ln.lo[2].data() + v)) & (c < vload<VI>(ln.hi[2].data() + v));
  }

  // Index of the rpb entry of column j for lane l (the lane sees the key).
  int64_t rpb_index(const Chunk& ch, const Lanes& ln, int j, int l) const {
    const int k0 = p.dims[0].kernel - 1, k1 = p.dims[1].kernel - 1, k2 = p.dims[2].kernel - 1;
    const int rid = ch.row_id[j];
    return (int64_t(ch.r0[rid] - ln.q[0][l] + k0) * rpb_dims[1] + (ch.r1[rid] - ln.q[1][l] + k1)) *
               rpb_dims[2] +
           (ch.col[j] - ln.q[2][l] + k2);
  }

  // Adds the rpb (log2 units) to the scores the window keeps.
  void add_bias(const Chunk& ch, const Lanes& ln, T* st) const {
    if (!p.rpb || ch.extra) return;
    const In* rpb = static_cast<const In*>(p.rpb);
    const int64_t rs = p.rpb_size();
    for (int j = 0; j < ch.n; ++j) {
      T* s = st + int64_t(j) * L;
      for (int l = 0; l < L; ++l) {
        if (!keeps(ch, ln, j, l)) continue;
        s[l] += T(to_float(rpb[ln.head[l] * rs + rpb_index(ch, ln, j, l)])) * T(kLog2e);
      }
    }
  }

  // Gathers d_rpb of the tile's heads (head % group_heads within the kv head's group) from dS^T.
  void add_bias_grad(const Chunk& ch, const Lanes& ln, const T* dst, const GradTarget& acc) const {
    if (!acc.rpb || ch.extra) return;
    const int64_t rs = p.rpb_size();
    for (int j = 0; j < ch.n; ++j) {
      const T* ds = dst + int64_t(j) * L;
      for (int l = 0; l < L; ++l) {
        if (!keeps(ch, ln, j, l)) continue;
        acc.rpb[(ln.head[l] % group_heads) * rs + rpb_index(ch, ln, j, l)] += ds[l];
      }
    }
  }
};

}  // namespace tokenmix::cpu::TOKENMIX_ISA
