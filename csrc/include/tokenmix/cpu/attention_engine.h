// The CPU attention engine: fused tiles of queries x chunks of keys with an
// online softmax (forward) and a recompute-from-LSE backward, parameterized by
// a tile schedule and its element mask (here: NeighborhoodSchedule).
//
// Layout of the work: the queries of one tile, for every query head that
// shares a key/value head (GQA/MQA), are the *lanes* of the SIMD vectors.
// Scores are computed transposed, S^T = K Q^T ([keys x lanes]), so the mask,
// the online softmax and the exponentials are plain vertical vector
// operations with no horizontal reductions, and key/value rows are read in
// place through row pointers instead of being packed. Every matrix product is
// the register-blocked GEMM of gemm.h. Extra memory is O(threads x tile) plus
// one fp32 copy of K and V when their dtype or padding needs it, and in the
// backward one fp32 dK/dV accumulator (none when the gradients are contiguous
// rows the GEMM can write in place); never O(tokens x window), never
// O(threads x tokens).
//
// Masked entries contribute exactly nothing. P and dS are formed by selection
// (never by multiplying with 0). A GEMM over P or dS would still add
// 0 * inf = NaN from a non-finite operand row to every lane of the tile, so the
// products with such rows are exact instead: the row leaves the GEMM and is
// added back only where the window keeps it (add_bad_key_rows for K and V rows,
// add_bad_lanes for Q and dO rows). Q and dO rows are checked as a tile loads
// them. K and V rows are checked only when a tile's O (forward) or dQ
// (backward) came out non-finite: that tile is then computed again with every
// chunk's rows checked. Finite inputs never take the exact path, and a key
// outside a query's window never reaches it, while inside the window IEEE
// arithmetic applies as in the reference (0 * inf is NaN).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "tokenmix/attention_problem.h"
#include "tokenmix/cpu/gemm.h"
#include "tokenmix/cpu/parallel.h"
#include "tokenmix/cpu/simd.h"
#include "tokenmix/neighborhood_schedule.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

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
struct RowSource {
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
void convert_rows(const NeighborhoodProblem& p, const StridedView& main, const StridedView& extra,
                  int dim, int padded, Buffer<T>& out) {
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

// Where the backward accumulates the dK and dV rows of one (batch, kv head): spatial token t at
// k + t * k_ld (v + t * v_ld), additional token e at ek + e * e_ldk (ev + e * e_ldv).
template <class T>
struct GradRows {
  T *k = nullptr, *v = nullptr, *ek = nullptr, *ev = nullptr;
  int64_t k_ld = 0, v_ld = 0, e_ldk = 0, e_ldv = 0;
};

template <class In, class T>
struct Engine {
  using V = typename Simd<T>::V;
  using VI = typename Simd<T>::VI;
  using I = typename Simd<T>::I;
  static constexpr int W = Simd<T>::kWidth;
  static constexpr int kChunk = 128;  // keys per chunk

  const NeighborhoodProblem& p;
  NeighborhoodSchedule sched;
  int group_heads, tile[3], tile_queries, lanes;  // lanes padded to W
  int D, Dv, dp, dvp;
  int rpb_dims[3];
  T qscale;  // softmax scale in log2 units
  RowSource<T> keys, values;
  Buffer<T> key_copy, value_copy;
  Buffer<T> zero_row;  // stands in for a non-finite row inside a GEMM
  // Window [lo, hi) of every (dilation group, group coordinate) per dimension.
  Buffer<int> win_lo[3], win_hi[3];

  Engine(const NeighborhoodProblem& prob, bool backward) : p(prob) {
    group_heads = int(p.heads / p.kv_heads);
    choose_tile(p, group_heads, W, tile);
    sched.init(p.dims, tile);
    tile_queries = tile[0] * tile[1] * tile[2];
    lanes = round_up(tile_queries * group_heads, W);
    D = int(p.head_dim);
    Dv = int(p.value_dim);
    dp = round_up(D, W);
    dvp = round_up(Dv, W);
    for (int t = 0; t < 3; ++t) rpb_dims[t] = 2 * p.dims[t].kernel - 1;
    qscale = T(p.scale * kLog2e);
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
      convert_rows<In, T>(p, p.k, p.extra_k, D, dp, key_copy);
      keys.converted = key_copy.data();
      keys.padded = dp;
      keys.rows = p.tokens() + p.num_extra;
    }
    if (same && !has_extra && Dv % W == 0) {
      values.base = static_cast<const T*>(p.v.data);
      for (int i = 0; i < 6; ++i) values.stride[i] = p.v.stride[i];
    } else {
      convert_rows<In, T>(p, p.v, p.extra_v, Dv, dvp, value_copy);
      values.converted = value_copy.data();
      values.padded = dvp;
      values.rows = p.tokens() + p.num_extra;
    }
    zero_row.assign(size_t(max_of(dp, dvp)), T(0));
  }

  // ---- per-thread state ----
  struct Lanes {
    Buffer<I> lo[3], hi[3];        // window per dimension, per lane
    Buffer<int> q[3];              // query group coordinates per lane
    Buffer<int> x[3];              // query real coordinates per lane
    Buffer<int> head;              // query head per lane (-1: inactive)
    Buffer<int64_t> token;         // flat query token per lane
    Buffer<I> alive;               // backward: -1 where the row has a key left (LSE > -inf), else 0
    Buffer<uint8_t> q_bad, g_bad;  // backward: the lane's Q (dO) row holds an inf or NaN
    bool any_q_bad = false, any_g_bad = false;
    Buffer<I> nan_logit;  // exact forward: -1 once a kept logit of the lane was NaN
  };

  struct Chunk {
    Buffer<const T*> krow, vrow;  // key / value row of each column
    Buffer<T*> gk, gv;            // gradient accumulator rows (backward)
    Buffer<int> col, row_id;      // last-dim group coordinate, index into row masks
    Buffer<int> r0, r1;           // leading key coordinates of each row id
    Buffer<I> row_mask;           // [rows x lanes]: lane sees this key row
    Buffer<uint8_t> bad;          // exact passes: the column's K or V row holds an inf or NaN
    int n = 0, rows = 0;
    bool extra = false;
  };

  struct Work {
    Lanes ln;
    Chunk ch;
    Buffer<T> qt, q, st, pt, o, dot, dor, dpt, dq;
    Buffer<T> row_max, row_sum, delta, alpha;
  };

  void init_work(Work& w, bool backward) const {
    const int L = lanes;
    for (int t = 0; t < 3; ++t) {
      w.ln.lo[t].assign(L, 0);
      w.ln.hi[t].assign(L, 0);
      w.ln.q[t].assign(L, 0);
      w.ln.x[t].assign(L, 0);
    }
    w.ln.head.assign(L, -1);
    w.ln.token.assign(L, 0);
    w.ch.krow.assign(kChunk, nullptr);
    w.ch.vrow.assign(kChunk, nullptr);
    w.ch.col.assign(kChunk, 0);
    w.ch.row_id.assign(kChunk, 0);
    w.ch.r0.assign(kChunk, 0);
    w.ch.r1.assign(kChunk, 0);
    w.ch.row_mask.assign(size_t(kChunk) * L, 0);
    w.ch.bad.assign(kChunk, 0);
    w.ln.nan_logit.assign(L, 0);
    w.qt.assign(size_t(D) * L, T(0));
    w.st.assign(size_t(kChunk) * L, T(0));
    w.o.assign(size_t(L) * dvp, T(0));
    w.row_max.assign(L, T(0));
    w.row_sum.assign(L, T(0));
    w.alpha.assign(L, T(0));
    if (backward) {
      w.ch.gk.assign(kChunk, nullptr);
      w.ch.gv.assign(kChunk, nullptr);
      w.q.assign(size_t(L) * dp, T(0));
      w.pt.assign(size_t(kChunk) * L, T(0));
      w.dot.assign(size_t(Dv) * L, T(0));
      w.dor.assign(size_t(L) * dvp, T(0));
      w.dpt.assign(size_t(kChunk) * L, T(0));
      w.dq.assign(size_t(L) * dp, T(0));
      w.delta.assign(L, T(0));
      w.ln.alive.assign(L, 0);
      w.ln.q_bad.assign(L, 0);
      w.ln.g_bad.assign(L, 0);
    }
  }

  // Fills the lane table of a tile (window bounds come from the precomputed
  // per-dimension tables: no divisions per lane).
  void setup_lanes(const TileGeometry& g, int64_t hk, Lanes& ln) const {
    for (int l = 0; l < lanes; ++l) {
      ln.head[l] = -1;
      for (int t = 0; t < 3; ++t) ln.lo[t][l] = ln.hi[t][l] = 0;  // sees nothing
    }
    const int* lo_t[3];
    const int* hi_t[3];
    for (int t = 0; t < 3; ++t) {
      lo_t[t] = win_lo[t].data() + int64_t(g.group[t]) * sched.max_group_len[t];
      hi_t[t] = win_hi[t].data() + int64_t(g.group[t]) * sched.max_group_len[t];
    }
    const int64_t l1 = p.dims[1].length, l2 = p.dims[2].length;
    for (int hg = 0; hg < group_heads; ++hg)
      for (int i0 = 0; i0 < g.count[0]; ++i0)
        for (int i1 = 0; i1 < g.count[1]; ++i1)
          for (int i2 = 0; i2 < g.count[2]; ++i2) {
            const int l = hg * tile_queries + (i0 * tile[1] + i1) * tile[2] + i2;
            const int qc[3] = {g.first[0] + i0, g.first[1] + i1, g.first[2] + i2};
            ln.head[l] = int(hk * group_heads + hg);
            for (int t = 0; t < 3; ++t) {
              ln.lo[t][l] = I(lo_t[t][qc[t]]);
              ln.hi[t][l] = I(hi_t[t][qc[t]]);
              ln.q[t][l] = qc[t];
              ln.x[t][l] = sched.real_coord(g, t, qc[t]);
            }
            ln.token[l] = (int64_t(ln.x[0][l]) * l1 + ln.x[1][l]) * l2 + ln.x[2][l];
          }
  }

  // Element offset of lane l's row in a [B, S0, S1, S2, H, D] view.
  int64_t lane_offset(const StridedView& view, int64_t b, const Lanes& ln, int l) const {
    return b * view.stride[0] + ln.x[0][l] * view.stride[1] + ln.x[1][l] * view.stride[2] +
           ln.x[2][l] * view.stride[3] + ln.head[l] * view.stride[4];
  }

  // Calls fn(chunk) for each chunk of keys of the tile's key box (rows that no
  // lane can see are skipped, and each row is cut to the columns some lane
  // sees), then for each chunk of additional tokens. `acc` (backward) gives the  // gradient row of
  // each key.
  template <class Fn>
  void for_each_chunk(int64_t b, int64_t hk, const TileGeometry& g, const Lanes& ln, Chunk& ch,
                      const GradRows<T>* acc, Fn&& fn) const {
    const int64_t l1 = p.dims[1].length, l2 = p.dims[2].length;
    const int64_t tokens = p.tokens();
    const int L = lanes;
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
    for (int r0 = g.key_begin[0]; r0 < g.key_end[0]; ++r0) {
      for (int r1 = g.key_begin[1]; r1 < g.key_end[1]; ++r1) {
        // A full chunk is flushed before a new row takes a slot: every row
        // holds at least one column, so rows <= columns < kChunk here.
        if (ch.n == kChunk) {
          emit();
          ch.n = 0;
          ch.rows = 0;
        }
        I* rm = ch.row_mask.data() + int64_t(ch.rows) * L;
        int cmin = g.key_end[2], cmax = g.key_begin[2];
        for (int l = 0; l < L; ++l) {
          const bool see = ln.head[l] >= 0 && r0 >= ln.lo[0][l] && r0 < ln.hi[0][l] &&
                           r1 >= ln.lo[1][l] && r1 < ln.hi[1][l];
          rm[l] = see ? I(-1) : I(0);
          if (see) {
            cmin = min_of<int>(cmin, int(ln.lo[2][l]));
            cmax = max_of<int>(cmax, int(ln.hi[2][l]));
          }
        }
        if (cmin >= cmax) continue;
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
            rid = 0;
          }
          const int j = ch.n++;
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
    ch.extra = true;
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

  // Loads rows of a [B, S.., H, dim] tensor for every lane into dst[lane][ld]
  // (row-major) and/or dst_t[dim][lanes] (transposed), multiplied by mult.
  void load_lanes(const StridedView& view, int64_t b, const Lanes& ln, int dim, T mult, T* dst,
                  int ld, T* dst_t) const {
    for (int l = 0; l < lanes; ++l) {
      if (ln.head[l] < 0) {
        if (dst) fill(dst + int64_t(l) * ld, dst + int64_t(l + 1) * ld, T(0));
        if (dst_t)
          for (int d = 0; d < dim; ++d) dst_t[int64_t(d) * lanes + l] = T(0);
        continue;
      }
      const In* src = static_cast<const In*>(view.data) + lane_offset(view, b, ln, l);
      if (dst) {
        T* row = dst + int64_t(l) * ld;
        for (int d = 0; d < dim; ++d) row[d] = T(to_float(src[d])) * mult;
        fill(row + dim, row + ld, T(0));
      }
      if (dst_t)
        for (int d = 0; d < dim; ++d) dst_t[int64_t(d) * lanes + l] = T(to_float(src[d])) * mult;
    }
  }

  // Whether every element of x[0, n) is finite (n a multiple of W): x * 0 is 0
  // for a finite x and NaN otherwise.
  static bool all_finite(const T* x, int64_t n) {
    V acc{};
    for (int64_t i = 0; i < n; i += W) acc += vload<V>(x + i) * T(0);
    for (int i = 0; i < W; ++i)
      if (acc[i] != T(0)) return false;
    return true;
  }

  // bad[i] = whether row i (n rows of `width` elements, a multiple of W) holds an
  // inf or NaN; returns whether any does.
  template <class Rows>
  static bool flag_rows(const Rows& rows, int n, int width, uint8_t* bad) {
    bool any = false;
    for (int i = 0; i < n; ++i) {
      bad[i] = all_finite(rows.row(i), width) ? 0 : 1;
      any |= bad[i] != 0;
    }
    return any;
  }

  // Whether lane l sees column j of the chunk: the window rule that bias_and_mask applies with
  // vectors, for one element.
  bool sees(const Chunk& ch, const Lanes& ln, int j, int l) const {
    if (!ch.row_mask[int64_t(ch.row_id[j]) * lanes + l]) return false;
    return ch.extra || (ch.col[j] >= ln.lo[2][l] && ch.col[j] < ln.hi[2][l]);
  }

  // C[l] += A^T[j][l] * row_j over the lanes l that see column j, for every column j flagged in
  // `bad`, and then replaces row_j by zeros in `rows` for the GEMM that follows: the GEMM of
  // C [L x dim] += A [L x n] * rows [n x dim] would add 0 * inf = NaN from a non-finite row to
  // the lanes whose window does not hold it. Rows inside a window keep IEEE arithmetic.
  void add_bad_key_rows(const Chunk& ch, const Lanes& ln, const uint8_t* bad, const T** rows,
                        const T* at, T* c, int ldc, int dim) const {
    for (int j = 0; j < ch.n; ++j) {
      if (!bad[j]) continue;
      const T* row = rows[j];
      for (int l = 0; l < lanes; ++l) {
        if (!sees(ch, ln, j, l)) continue;
        const T a = at[int64_t(j) * lanes + l];
        T* crow = c + int64_t(l) * ldc;
        for (int d = 0; d < dim; ++d) crow[d] += a * row[d];
      }
      rows[j] = zero_row.data();
    }
  }

  // The lane-side counterpart, for C_rows [n x dim] += A^T [n x L] * X [L x dim] where the X rows
  // of the flagged lanes were zeroed at tile setup: crow_j += A^T[j][l] * x_l for every column j
  // lane l sees, x_l read from the transposed copy xt [dim x L].
  void add_bad_lanes(const Chunk& ch, const Lanes& ln, const uint8_t* bad, const T* at, const T* xt,
                     T* const* crows, int dim) const {
    for (int l = 0; l < lanes; ++l) {
      if (!bad[l]) continue;
      for (int j = 0; j < ch.n; ++j) {
        if (!sees(ch, ln, j, l)) continue;
        const T a = at[int64_t(j) * lanes + l];
        T* crow = crows[j];
        for (int d = 0; d < dim; ++d) crow[d] += a * xt[int64_t(d) * lanes + l];
      }
    }
  }

  // Adds the rpb (log2 units) to the scores the window keeps.
  void add_rpb(const Chunk& ch, const Lanes& ln, T* st) const {
    if (!p.rpb || ch.extra) return;
    const In* rpb = static_cast<const In*>(p.rpb);
    const int64_t rs = p.rpb_size();
    const int k0 = p.dims[0].kernel - 1, k1 = p.dims[1].kernel - 1, k2 = p.dims[2].kernel - 1;
    for (int j = 0; j < ch.n; ++j) {
      const I* rm = ch.row_mask.data() + int64_t(ch.row_id[j]) * lanes;
      const int r0 = ch.r0[ch.row_id[j]], r1 = ch.r1[ch.row_id[j]], c = ch.col[j];
      T* s = st + int64_t(j) * lanes;
      for (int l = 0; l < lanes; ++l) {
        if (!rm[l] || c < ln.lo[2][l] || c >= ln.hi[2][l]) continue;
        const int64_t idx =
            (int64_t(r0 - ln.q[0][l] + k0) * rpb_dims[1] + (r1 - ln.q[1][l] + k1)) * rpb_dims[2] +
            (c - ln.q[2][l] + k2);
        s[l] += T(to_float(rpb[ln.head[l] * rs + idx])) * T(kLog2e);
      }
    }
  }

  // The window mask of column j for lanes [v, v + W): -1 where the lane sees the key.
  VI keep_mask(const Chunk& ch, const Lanes& ln, int j, int v) const {
    const VI row = vload<VI>(ch.row_mask.data() + int64_t(ch.row_id[j]) * lanes + v);
    if (ch.extra) return row;
    const VI c = vbroadcast<VI>(I(ch.col[j]));
    return row & (c >= vload<VI>(ln.lo[2].data() + v)) & (c < vload<VI>(ln.hi[2].data() + v));
  }

  // Scores of one chunk -> masked (and biased) logits in log2 units, in place.
  void bias_and_mask(const Chunk& ch, const Lanes& ln, T* st) const {
    const V vninf = vbroadcast<V>(-std::numeric_limits<T>::infinity());
    add_rpb(ch, ln, st);
    for (int j = 0; j < ch.n; ++j) {
      T* s = st + int64_t(j) * lanes;
      for (int v = 0; v < lanes; v += W)
        vstore(s + v, keep_mask(ch, ln, j, v) != 0 ? vload<V>(s + v) : vninf);
    }
  }

  void forward_tile(Work& w, int64_t b, int64_t hk, const TileGeometry& g) const;
  void forward_pass(Work& w, int64_t b, int64_t hk, const TileGeometry& g, bool exact) const;
  void backward_tile(Work& w, int64_t b, int64_t hk, const TileGeometry& g, const GradRows<T>& acc,
                     T* acc_rpb) const;
  void backward_pass(Work& w, int64_t b, int64_t hk, const TileGeometry& g, const GradRows<T>* acc,
                     T* acc_rpb) const;
};

// ---------------------------------------------------------------- forward --

// The online softmax over the tile's chunks into w.o, w.row_max, w.row_sum
// (lanes and Q^T already loaded). `exact`: each chunk's V rows are checked and
// the non-finite ones multiplied only where windows keep them, and NaN logits
// are recorded per lane (for the LSE).
template <class In, class T>
void Engine<In, T>::forward_pass(Work& w, int64_t b, int64_t hk, const TileGeometry& g,
                                 bool exact) const {
  const int L = lanes;
  const T ninf = -std::numeric_limits<T>::infinity();
  const V vninf = vbroadcast<V>(ninf);
  fill(w.o.begin(), w.o.end(), T(0));
  fill(w.row_max.begin(), w.row_max.end(), ninf);
  fill(w.row_sum.begin(), w.row_sum.end(), T(0));
  fill(w.ln.nan_logit.begin(), w.ln.nan_logit.end(), I(0));
  T* st = w.st.data();

  for_each_chunk(b, hk, g, w.ln, w.ch, nullptr, [&](Chunk& ch) {
    const int n = ch.n;
    // S^T [n x L] = K_rows [n x D] * Q^T [D x L]
    gemm<T>(n, L, D, TableRows<const T>{ch.krow.data()}, 1, StridedRows<const T>{w.qt.data(), L},
            StridedRows<T>{st, L}, false);
    bias_and_mask(ch, w.ln, st);
    for (int v = 0; v < L; v += W) {
      V cm = vninf;
      for (int j = 0; j < n; ++j) {
        const V x = vload<V>(st + int64_t(j) * L + v);
        cm = x > cm ? x : cm;
      }
      if (exact) {
        VI nan_seen = vload<VI>(w.ln.nan_logit.data() + v);
        for (int j = 0; j < n; ++j) {
          const V x = vload<V>(st + int64_t(j) * L + v);
          nan_seen |= x != x;
        }
        vstore(w.ln.nan_logit.data() + v, nan_seen);
      }
      const V m_old = vload<V>(w.row_max.data() + v);
      const V m_new = cm > m_old ? cm : m_old;
      const V safe = m_new == vninf ? V{} : m_new;
      const V alpha = vexp2(m_old - safe);
      V sum = V{};
      for (int j = 0; j < n; ++j) {
        T* sp = st + int64_t(j) * L + v;
        const V e = vexp2(vload<V>(sp) - safe);
        sum += e;
        vstore(sp, e);
      }
      vstore(w.row_sum.data() + v, vload<V>(w.row_sum.data() + v) * alpha + sum);
      vstore(w.row_max.data() + v, m_new);
      vstore(w.alpha.data() + v, alpha);
    }
    for (int l = 0; l < L; ++l) {
      const T a = w.alpha[l];
      if (a == T(1)) continue;
      T* orow = w.o.data() + int64_t(l) * dvp;
      for (int d = 0; d < dvp; ++d) orow[d] *= a;
    }
    if (exact && flag_rows(TableRows<const T>{ch.vrow.data()}, n, dvp, ch.bad.data()))
      add_bad_key_rows(ch, w.ln, ch.bad.data(), ch.vrow.data(), st, w.o.data(), dvp, Dv);
    // O [L x Dv] += P [L x n] (read transposed from S^T) * V_rows [n x Dv]
    gemm<T>(L, dvp, n, StridedRows<const T>{st, 1}, L, TableRows<const T>{ch.vrow.data()},
            StridedRows<T>{w.o.data(), dvp}, true);
  });
}

template <class In, class T>
void Engine<In, T>::forward_tile(Work& w, int64_t b, int64_t hk, const TileGeometry& g) const {
  const int L = lanes;
  const double inf = std::numeric_limits<double>::infinity();
  setup_lanes(g, hk, w.ln);
  load_lanes(p.q, b, w.ln, D, qscale, nullptr, 0, w.qt.data());
  forward_pass(w, b, hk, g, false);
  // A non-finite V row in a chunk's GEMM turns the masked (0) probabilities of
  // every lane of the tile into NaN. Rather than check every chunk, a tile whose
  // O came out non-finite anywhere is computed again with the exact product.
  const bool exact = !all_finite(w.o.data(), int64_t(L) * dvp);
  if (exact) forward_pass(w, b, hk, g, true);

  for (int l = 0; l < L; ++l) {
    if (w.ln.head[l] < 0) continue;
    const int64_t tok = w.ln.token[l];
    In* dst = static_cast<In*>(p.out.data) + lane_offset(p.out, b, w.ln, l);
    const T sum = w.row_sum[l], m = w.row_max[l];
    // sum == 0: no key left (every logit -inf): output 0, LSE -inf.
    const T inv = sum == T(0) ? T(0) : T(1) / sum;
    const T* orow = w.o.data() + int64_t(l) * dvp;
    for (int d = 0; d < Dv; ++d) dst[d] = from_float<In>(orow[d] * inv);
    // As torch.logsumexp: NaN with a NaN logit, else +inf with a +inf logit.
    // (Either makes O non-finite, so nan_logit is known: the pass was exact.)
    double lse2;
    if (exact && w.ln.nan_logit[l])
      lse2 = std::numeric_limits<double>::quiet_NaN();
    else if (double(m) == inf)
      lse2 = inf;
    else if (sum == T(0))
      lse2 = -inf;
    else
      lse2 = double(m) + std::log2(double(sum));
    static_cast<T*>(p.lse)[(b * p.tokens() + tok) * p.heads + w.ln.head[l]] = T(lse2 * kLn2);
  }
}

template <class In, class T>
void neighborhood_forward(const NeighborhoodProblem& p) {
  const Engine<In, T> eng(p, false);
  const int64_t per_head = eng.sched.tiles_per_head();
  run_parallel(p, p.batch * p.kv_heads * per_head, 1, [&](int64_t begin, int64_t end) {
    typename Engine<In, T>::Work w;
    eng.init_work(w, false);
    TileGeometry g;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / per_head;
      if (eng.sched.decode(it % per_head, &g))
        eng.forward_tile(w, bh / p.kv_heads, bh % p.kv_heads, g);
    }
  });
}

// --------------------------------------------------------------- backward --

template <class In, class T>
void Engine<In, T>::backward_tile(Work& w, int64_t b, int64_t hk, const TileGeometry& g,
                                  const GradRows<T>& acc, T* acc_rpb) const {
  const int L = lanes;
  const T ninf = -std::numeric_limits<T>::infinity();
  setup_lanes(g, hk, w.ln);
  load_lanes(p.q, b, w.ln, D, qscale, w.q.data(), dp, w.qt.data());
  load_lanes(p.grad_out, b, w.ln, Dv, T(1), w.dor.data(), dvp, w.dot.data());
  load_lanes(p.out, b, w.ln, Dv, T(1), w.o.data(), dvp, nullptr);
  for (int l = 0; l < L; ++l) {
    w.ln.alive[l] = 0;
    if (w.ln.head[l] < 0) {
      w.row_max[l] = 0;
      w.delta[l] = 0;
      continue;
    }
    w.row_max[l] = T(double(static_cast<const T*>(
                         p.lse)[(b * p.tokens() + w.ln.token[l]) * p.heads + w.ln.head[l]]) *
                     kLog2e);
    // A row whose logits were all -inf (LSE -inf) has P = 0 and dS = 0 everywhere.
    w.ln.alive[l] = w.row_max[l] != ninf ? I(-1) : I(0);
    T dl = 0;
    const T* orow = w.o.data() + int64_t(l) * dvp;
    const T* grow = w.dor.data() + int64_t(l) * dvp;
    for (int d = 0; d < Dv; ++d) dl += orow[d] * grow[d];
    // d lse / d logit = P, so an LSE gradient enters as a shift of delta.
    if (p.grad_lse)
      dl -= static_cast<const T*>(
          p.grad_lse)[(b * p.tokens() + w.ln.token[l]) * p.heads + w.ln.head[l]];
    w.delta[l] = dl;
  }
  // Non-finite Q (dO) rows leave the dK (dV) GEMM: add_bad_lanes adds them
  // where windows keep them. Their transposed copies keep the values.
  w.ln.any_q_bad = flag_rows(StridedRows<const T>{w.q.data(), dp}, L, dp, w.ln.q_bad.data());
  w.ln.any_g_bad = flag_rows(StridedRows<const T>{w.dor.data(), dvp}, L, dvp, w.ln.g_bad.data());
  for (int l = 0; l < L; ++l) {
    if (w.ln.q_bad[l]) fill(w.q.data() + int64_t(l) * dp, w.q.data() + int64_t(l + 1) * dp, T(0));
    if (w.ln.g_bad[l])
      fill(w.dor.data() + int64_t(l) * dvp, w.dor.data() + int64_t(l + 1) * dvp, T(0));
  }
  backward_pass(w, b, hk, g, &acc, acc_rpb);
  // A non-finite K row in the dQ GEMM turns the masked (0) dS of every lane of
  // the tile into NaN: a tile whose dQ came out non-finite computes dQ again,
  // alone, with the exact product.
  if (!all_finite(w.dq.data(), int64_t(L) * dp)) backward_pass(w, b, hk, g, nullptr, nullptr);

  const T qs = T(p.scale);
  for (int l = 0; l < L; ++l) {
    if (w.ln.head[l] < 0) continue;
    In* dst = static_cast<In*>(p.grad_q.data) + lane_offset(p.grad_q, b, w.ln, l);
    const T* row = w.dq.data() + int64_t(l) * dp;
    for (int d = 0; d < D; ++d) dst[d] = from_float<In>(row[d] * qs);
  }
}

// Recomputes P and dS of every chunk from the LSE and accumulates dQ into w.dq,
// and with `acc` dK/dV (and d_rpb into acc_rpb). Without `acc`: the exact dQ
// pass, which checks each chunk's K rows and adds nothing else.
template <class In, class T>
void Engine<In, T>::backward_pass(Work& w, int64_t b, int64_t hk, const TileGeometry& g,
                                  const GradRows<T>* acc, T* acc_rpb) const {
  const int L = lanes;
  fill(w.dq.begin(), w.dq.end(), T(0));
  T* st = w.st.data();
  T* dpt = w.dpt.data();
  const int64_t rs = p.rpb_size();

  for_each_chunk(b, hk, g, w.ln, w.ch, acc, [&](Chunk& ch) {
    const int n = ch.n;
    gemm<T>(n, L, D, TableRows<const T>{ch.krow.data()}, 1, StridedRows<const T>{w.qt.data(), L},
            StridedRows<T>{st, L}, false);
    // dP^T [n x L] = V_rows [n x Dv] * dO^T [Dv x L]
    gemm<T>(n, L, Dv, TableRows<const T>{ch.vrow.data()}, 1, StridedRows<const T>{w.dot.data(), L},
            StridedRows<T>{dpt, L}, false);
    add_rpb(ch, w.ln, st);
    // P and dS by selection from the window mask: exactly 0 outside the window
    // and on rows without keys, whatever the scores, dP, delta or the LSE hold.
    for (int j = 0; j < n; ++j)
      for (int v = 0; v < L; v += W) {
        T* sp = st + int64_t(j) * L + v;
        T* dpp = dpt + int64_t(j) * L + v;
        const VI kv = keep_mask(ch, w.ln, j, v) & vload<VI>(w.ln.alive.data() + v);
        const V pr = kv != 0 ? vexp2(vload<V>(sp) - vload<V>(w.row_max.data() + v)) : V{};
        const V ds = pr * (vload<V>(dpp) - vload<V>(w.delta.data() + v));
        vstore(sp, pr);                   // P^T
        vstore(dpp, kv != 0 ? ds : V{});  // dS^T
      }
    if (acc_rpb && !ch.extra) {
      const int k0 = p.dims[0].kernel - 1, k1 = p.dims[1].kernel - 1, k2 = p.dims[2].kernel - 1;
      for (int j = 0; j < n; ++j) {
        const I* rm = ch.row_mask.data() + int64_t(ch.row_id[j]) * L;
        const int r0 = ch.r0[ch.row_id[j]], r1 = ch.r1[ch.row_id[j]], c = ch.col[j];
        const T* ds = dpt + int64_t(j) * L;
        for (int l = 0; l < L; ++l) {
          if (!rm[l] || c < w.ln.lo[2][l] || c >= w.ln.hi[2][l]) continue;
          const int64_t idx =
              (int64_t(r0 - w.ln.q[0][l] + k0) * rpb_dims[1] + (r1 - w.ln.q[1][l] + k1)) *
                  rpb_dims[2] +
              (c - w.ln.q[2][l] + k2);
          acc_rpb[(w.ln.head[l] - hk * group_heads) * rs + idx] += ds[l];
        }
      }
    }
    // dQ [L x D] += dS [L x n] * K_rows [n x D]
    if (!acc && flag_rows(TableRows<const T>{ch.krow.data()}, n, dp, ch.bad.data()))
      add_bad_key_rows(ch, w.ln, ch.bad.data(), ch.krow.data(), dpt, w.dq.data(), dp, D);
    gemm<T>(L, dp, n, StridedRows<const T>{dpt, 1}, L, TableRows<const T>{ch.krow.data()},
            StridedRows<T>{w.dq.data(), dp}, true);
    if (!acc) return;
    // dK_rows [n x D] += dS^T [n x L] * Q [L x D];  dV_rows += P^T * dO
    gemm<T>(n, dp, L, StridedRows<const T>{dpt, L}, 1, StridedRows<const T>{w.q.data(), dp},
            TableRows<T>{ch.gk.data()}, true);
    gemm<T>(n, dvp, L, StridedRows<const T>{st, L}, 1, StridedRows<const T>{w.dor.data(), dvp},
            TableRows<T>{ch.gv.data()}, true);
    if (w.ln.any_q_bad)
      add_bad_lanes(ch, w.ln, w.ln.q_bad.data(), dpt, w.qt.data(), ch.gk.data(), D);
    if (w.ln.any_g_bad)
      add_bad_lanes(ch, w.ln, w.ln.g_bad.data(), st, w.dot.data(), ch.gv.data(), Dv);
  });
}

// ---------------------------------------------------------- backward schedule --
//
// The dK/dV rows of a (batch, kv head) are summed in one fp32 (fp64) buffer, or
// in the gradient tensors themselves when their rows are T rows the GEMM can
// write. Its query tiles are cut into *stripes*: runs of `width` tiles along one
// tile dimension, wide enough that the key boxes of stripes s and s + 2 of a
// dilation group never overlap. Phase 0 runs the even stripes of every (batch,
// kv head, dilation group) at once, phase 1 the odd ones, so no two concurrent
// tasks add to the same row and nothing is locked. Each key receives its
// contributions in one fixed order (its even stripe's tiles, then its odd
// stripe's), so the gradients are the same bit for bit for any thread count.
// The additional tokens and the rpb, which every stripe touches, are summed per
// *part* (a run of one phase's stripes) into partial buffers reduced in order at
// the end; parts are capped so that those buffers stay within half the size of
// K and V in fp32. Extra memory is therefore at most about K + V in fp32 plus
// the dK/dV buffer, whatever the thread count.

// Smallest stripe width (tiles along dimension t) for which stripes s and s + 2 of every dilation
// group have disjoint key ranges; tiles_per_dim[t] (one stripe) when none is narrower.
inline int stripe_width(const NeighborhoodSchedule& sc, int t) {
  const WindowDim& d = sc.dims[t];
  const int tiles = sc.tiles_per_dim[t];
  const int lens[2] = {dilation_group_length(d.length, d.dilation, 0),
                       dilation_group_length(d.length, d.dilation, d.dilation - 1)};
  for (int w = 1; w < tiles; ++w) {
    const int span = w * sc.tile[t];
    bool ok = true;
    for (int li = 0; li < 2 && ok; ++li) {
      const int glen = lens[li];
      for (int first = 0; first + 2 * span < glen && ok; first += span) {
        int b0, e0, b2, e2;
        window_union(first, first + span - 1, glen, d.kernel, d.stride, d.causal, &b0, &e0);
        const int f2 = first + 2 * span;
        window_union(f2, min_of(f2 + span, glen) - 1, glen, d.kernel, d.stride, d.causal, &b2, &e2);
        ok = e0 <= b2;
      }
    }
    if (ok) return w;
  }
  return tiles;
}

struct StripePlan {
  int dim = 2, width = 1;  // stripes cut tile dimension `dim`, `width` tiles each
  int64_t stripes = 1;     // per dilation group
  int64_t groups = 1;      // dilation groups (all dimensions together)
  int64_t per_group = 1;   // tiles per dilation group
  int64_t items[2] = {0, 0}, half[2] = {0, 0}, parts[2] = {0, 0};

  // part_elems: partial-buffer elements a part needs; budget: the elements all parts of one
  // (batch, kv head) may use. Depends on the problem only, never on the thread count.
  void init(const NeighborhoodSchedule& sc, int64_t part_elems, int64_t budget) {
    for (int t = 0; t < 3; ++t) {
      const int w = stripe_width(sc, t);
      const int64_t n = (sc.tiles_per_dim[t] + w - 1) / w;
      if (n > stripes) {
        stripes = n;
        dim = t;
        width = w;
      }
    }
    if (stripes == 1) width = sc.tiles_per_dim[dim];
    groups = int64_t(sc.dims[0].dilation) * sc.dims[1].dilation * sc.dims[2].dilation;
    per_group = int64_t(sc.tiles_per_dim[0]) * sc.tiles_per_dim[1] * sc.tiles_per_dim[2];
    const int64_t cap = part_elems > 0 ? max_of<int64_t>(1, budget / (2 * part_elems)) : -1;
    for (int ph = 0; ph < 2; ++ph) {
      half[ph] = (stripes - ph + 1) / 2;  // stripes ph, ph + 2, ... of one group
      items[ph] = groups * half[ph];
      parts[ph] = cap < 0 ? items[ph] : min_of(items[ph], cap);
    }
  }

  // Calls fn(tile index) for the tiles of item k of phase ph, in schedule order.
  template <class Fn>
  void for_each_tile(const NeighborhoodSchedule& sc, int ph, int64_t k, Fn&& fn) const {
    const int64_t group = k / half[ph], stripe = ph + 2 * (k % half[ph]);
    int lo[3] = {0, 0, 0}, hi[3];
    for (int t = 0; t < 3; ++t) hi[t] = sc.tiles_per_dim[t];
    lo[dim] = int(stripe * width);
    hi[dim] = min_of<int>(hi[dim], int((stripe + 1) * width));
    for (int a = lo[0]; a < hi[0]; ++a)
      for (int b = lo[1]; b < hi[1]; ++b)
        for (int c = lo[2]; c < hi[2]; ++c)
          fn(group * per_group + (int64_t(a) * sc.tiles_per_dim[1] + b) * sc.tiles_per_dim[2] + c);
  }
};

template <class In, class T>
void neighborhood_backward(const NeighborhoodProblem& p) {
  const Engine<In, T> eng(p, true);
  const int64_t pairs = p.batch * p.kv_heads;
  const int64_t tokens = p.tokens(), E = p.num_extra;
  const int64_t D = p.head_dim, Dv = p.value_dim, Hkv = p.kv_heads;
  const int64_t dp = eng.dp, dvp = eng.dvp, G = eng.group_heads;
  const int64_t rs = p.rpb_size();
  const int64_t rpb_elems = p.rpb ? G * rs : 0;

  StripePlan plan;
  plan.init(eng.sched, E * (dp + dvp) + rpb_elems, (tokens + E) * (dp + dvp) / 2);
  const int64_t slots = plan.parts[0] + plan.parts[1];  // partial buffers per (batch, kv head)

  // dK/dV rows: the gradient tensors themselves when they are contiguous T rows of the padded
  // width (one kv head: with more, rows H_kv * D apart would use a fraction of the cache sets),
  // zeroed here; else one zeroed buffer [pairs, tokens, padded dim].
  const bool native = sizeof(In) == sizeof(T) && p.dtype != DType::kFloat16 &&
                      p.dtype != DType::kBFloat16 && Hkv == 1;
  const bool k_direct = native && D == dp, v_direct = native && Dv == dvp;
  T* const grad_k = static_cast<T*>(p.grad_k.data);
  T* const grad_v = static_cast<T*>(p.grad_v.data);
  Buffer<T> acc_k, acc_v, part_k, part_v, part_rpb;
  if (k_direct) {
    run_parallel(p, pairs * tokens, 256, [&](int64_t begin, int64_t end) {
      fill(grad_k + begin * D, grad_k + end * D, T(0));
    });
  } else {
    acc_k.assign(size_t(pairs * tokens * dp), T(0));
  }
  if (v_direct) {
    run_parallel(p, pairs * tokens, 256, [&](int64_t begin, int64_t end) {
      fill(grad_v + begin * Dv, grad_v + end * Dv, T(0));
    });
  } else {
    acc_v.assign(size_t(pairs * tokens * dvp), T(0));
  }
  part_k.assign(size_t(pairs * slots * E * dp), T(0));
  part_v.assign(size_t(pairs * slots * E * dvp), T(0));
  part_rpb.assign(size_t(pairs * slots * rpb_elems), T(0));

  for (int ph = 0; ph < 2; ++ph) {
    const int64_t parts = plan.parts[ph], items = plan.items[ph];
    run_parallel(p, pairs * parts, 1, [&](int64_t begin, int64_t end) {
      typename Engine<In, T>::Work w;
      eng.init_work(w, true);
      TileGeometry g;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t pair = task / parts, part = task % parts;
        const int64_t b = pair / Hkv, hk = pair % Hkv;
        const int64_t slot = pair * slots + (ph ? plan.parts[0] : 0) + part;
        GradRows<T> acc;
        if (k_direct) {
          acc.k = grad_k + (b * tokens * Hkv + hk) * D;
          acc.k_ld = Hkv * D;
        } else {
          acc.k = acc_k.data() + pair * tokens * dp;
          acc.k_ld = dp;
        }
        if (v_direct) {
          acc.v = grad_v + (b * tokens * Hkv + hk) * Dv;
          acc.v_ld = Hkv * Dv;
        } else {
          acc.v = acc_v.data() + pair * tokens * dvp;
          acc.v_ld = dvp;
        }
        acc.ek = part_k.data() + slot * E * dp;
        acc.ev = part_v.data() + slot * E * dvp;
        acc.e_ldk = dp;
        acc.e_ldv = dvp;
        T* rpb_acc = p.rpb ? part_rpb.data() + slot * rpb_elems : nullptr;
        const int64_t k0 = items * part / parts, k1 = items * (part + 1) / parts;
        for (int64_t k = k0; k < k1; ++k)
          plan.for_each_tile(eng.sched, ph, k, [&](int64_t it) {
            if (eng.sched.decode(it, &g)) eng.backward_tile(w, b, hk, g, acc, rpb_acc);
          });
      }
    });
  }

  // Write dK, dV and the additional tokens' gradients, contiguous [B, tokens, H_kv, D]. dK was
  // accumulated against the log2-scaled query, hence the factor ln 2. The partials of the
  // additional tokens are summed in slot order.
  const T kscale = T(kLn2);
  const int64_t rows = tokens + E;
  run_parallel(p, pairs * rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t pair = idx / rows, tok = idx % rows;
      const int64_t b = pair / Hkv, hk = pair % Hkv;
      if (tok < tokens) {
        In* dk = static_cast<In*>(p.grad_k.data) + ((b * tokens + tok) * Hkv + hk) * D;
        In* dv = static_cast<In*>(p.grad_v.data) + ((b * tokens + tok) * Hkv + hk) * Dv;
        if (k_direct) {
          T* row = reinterpret_cast<T*>(dk);
          for (int64_t d = 0; d < D; ++d) row[d] *= kscale;
        } else {
          const T* row = acc_k.data() + (pair * tokens + tok) * dp;
          for (int64_t d = 0; d < D; ++d) dk[d] = from_float<In>(row[d] * kscale);
        }
        if (!v_direct) {
          const T* row = acc_v.data() + (pair * tokens + tok) * dvp;
          for (int64_t d = 0; d < Dv; ++d) dv[d] = from_float<In>(row[d]);
        }
        continue;
      }
      const int64_t e = tok - tokens;
      In* dk = static_cast<In*>(p.grad_extra_k.data) + ((b * E + e) * Hkv + hk) * D;
      In* dv = static_cast<In*>(p.grad_extra_v.data) + ((b * E + e) * Hkv + hk) * Dv;
      for (int64_t d = 0; d < D; ++d) {
        T sum = 0;
        for (int64_t sl = 0; sl < slots; ++sl)
          sum += part_k[size_t(((pair * slots + sl) * E + e) * dp + d)];
        dk[d] = from_float<In>(sum * kscale);
      }
      for (int64_t d = 0; d < Dv; ++d) {
        T sum = 0;
        for (int64_t sl = 0; sl < slots; ++sl)
          sum += part_v[size_t(((pair * slots + sl) * E + e) * dvp + d)];
        dv[d] = from_float<In>(sum);
      }
    }
  });
  if (p.rpb) {
    T* out = static_cast<T*>(p.grad_rpb);
    fill(out, out + p.heads * rs, T(0));
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t hk = pair % Hkv;
      for (int64_t sl = 0; sl < slots; ++sl)
        for (int64_t hg = 0; hg < G; ++hg)
          for (int64_t e = 0; e < rs; ++e)
            out[(hk * G + hg) * rs + e] +=
                part_rpb[size_t((pair * slots + sl) * rpb_elems + hg * rs + e)];
    }
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
