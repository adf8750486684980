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
// one fp32 copy of K and V when their dtype or padding needs it; never
// O(tokens x window).
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
  }

  // ---- per-thread state ----
  struct Lanes {
    Buffer<I> lo[3], hi[3];  // window per dimension, per lane
    Buffer<int> q[3];        // query group coordinates per lane
    Buffer<int> x[3];        // query real coordinates per lane
    Buffer<int> head;        // query head per lane (-1: inactive)
    Buffer<int64_t> token;   // flat query token per lane
  };

  struct Chunk {
    Buffer<const T*> krow, vrow;  // key / value row of each column
    Buffer<T*> gk, gv;            // gradient accumulator rows (backward)
    Buffer<int> col, row_id;      // last-dim group coordinate, index into row masks
    Buffer<int> r0, r1;           // leading key coordinates of each row id
    Buffer<I> row_mask;           // [rows x lanes]: lane sees this key row
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
  // sees), then for each chunk of additional tokens. acc_k/acc_v (backward)
  // give the gradient row of each key.
  template <class Fn>
  void for_each_chunk(int64_t b, int64_t hk, const TileGeometry& g, const Lanes& ln, Chunk& ch,
                      T* acc_k, T* acc_v, Fn&& fn) const {
    const int64_t l1 = p.dims[1].length, l2 = p.dims[2].length;
    const int L = lanes;
    ch.n = 0;
    ch.rows = 0;
    ch.extra = false;
    for (int r0 = g.key_begin[0]; r0 < g.key_end[0]; ++r0) {
      for (int r1 = g.key_begin[1]; r1 < g.key_end[1]; ++r1) {
        // A full chunk is flushed before a new row takes a slot: every row
        // holds at least one column, so rows <= columns < kChunk here.
        if (ch.n == kChunk) {
          fn(ch);
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
            fn(ch);
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
          if (acc_k) {
            ch.gk[j] = acc_k + tok * dp;
            ch.gv[j] = acc_v + tok * dvp;
          }
        }
      }
    }
    if (ch.n > 0) fn(ch);
    if (p.num_extra == 0) return;
    const int64_t tokens = p.tokens();
    ch.extra = true;
    ch.rows = 1;
    for (int l = 0; l < L; ++l) ch.row_mask[l] = ln.head[l] >= 0 ? I(-1) : I(0);
    for (int64_t e0 = 0; e0 < p.num_extra; e0 += kChunk) {
      ch.n = int(min_of<int64_t>(kChunk, p.num_extra - e0));
      for (int j = 0; j < ch.n; ++j) {
        const int64_t tok = tokens + e0 + j;
        ch.krow[j] = keys.extra_row(b, hk, tokens, e0 + j, p);
        ch.vrow[j] = values.extra_row(b, hk, tokens, e0 + j, p);
        ch.col[j] = 0;
        ch.row_id[j] = 0;
        if (acc_k) {
          ch.gk[j] = acc_k + tok * dp;
          ch.gv[j] = acc_v + tok * dvp;
        }
      }
      fn(ch);
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

  // Scores of one chunk -> masked (and biased) logits in log2 units, in place.
  void bias_and_mask(const Chunk& ch, const Lanes& ln, T* st) const {
    const T ninf = -std::numeric_limits<T>::infinity();
    const V vninf = vbroadcast<V>(ninf);
    if (p.rpb && !ch.extra) {
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
    if (ch.extra) {
      for (int j = 0; j < ch.n; ++j)
        for (int v = 0; v < lanes; v += W) {
          const VI active = vload<VI>(ch.row_mask.data() + v);
          vstore(st + int64_t(j) * lanes + v,
                 active != 0 ? vload<V>(st + int64_t(j) * lanes + v) : vninf);
        }
      return;
    }
    for (int j = 0; j < ch.n; ++j) {
      const I* rm = ch.row_mask.data() + int64_t(ch.row_id[j]) * lanes;
      const VI c = vbroadcast<VI>(I(ch.col[j]));
      T* s = st + int64_t(j) * lanes;
      for (int v = 0; v < lanes; v += W) {
        const VI keep = vload<VI>(rm + v) & (c >= vload<VI>(ln.lo[2].data() + v)) &
                        (c < vload<VI>(ln.hi[2].data() + v));
        vstore(s + v, keep != 0 ? vload<V>(s + v) : vninf);
      }
    }
  }

  void forward_tile(Work& w, int64_t b, int64_t hk, const TileGeometry& g) const;
  void backward_tile(Work& w, int64_t b, int64_t hk, const TileGeometry& g, T* acc_k, T* acc_v,
                     T* acc_rpb) const;
};

// ---------------------------------------------------------------- forward --

template <class In, class T>
void Engine<In, T>::forward_tile(Work& w, int64_t b, int64_t hk, const TileGeometry& g) const {
  const int L = lanes;
  const T ninf = -std::numeric_limits<T>::infinity();
  const V vninf = vbroadcast<V>(ninf);
  setup_lanes(g, hk, w.ln);
  load_lanes(p.q, b, w.ln, D, qscale, nullptr, 0, w.qt.data());
  fill(w.o.begin(), w.o.end(), T(0));
  fill(w.row_max.begin(), w.row_max.end(), ninf);
  fill(w.row_sum.begin(), w.row_sum.end(), T(0));
  T* st = w.st.data();

  for_each_chunk(b, hk, g, w.ln, w.ch, nullptr, nullptr, [&](Chunk& ch) {
    const int n = ch.n;
    // S^T [n x L] = K_rows [n x D] * Q^T [D x L]
    gemm<T>(n, L, D, TableRows<const T>{ch.krow.data()}, 1, StridedRows<const T>{w.qt.data(), L},
            StridedRows<T>{st, L}, false);
    bias_and_mask(ch, w.ln, st);
    bool rescale = false;
    for (int v = 0; v < L; v += W) {
      V cm = vninf;
      for (int j = 0; j < n; ++j) {
        const V x = vload<V>(st + int64_t(j) * L + v);
        cm = x > cm ? x : cm;
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
      rescale = true;
      T* orow = w.o.data() + int64_t(l) * dvp;
      for (int d = 0; d < dvp; ++d) orow[d] *= a;
    }
    (void)rescale;
    // O [L x Dv] += P [L x n] (read transposed from S^T) * V_rows [n x Dv]
    gemm<T>(L, dvp, n, StridedRows<const T>{st, 1}, L, TableRows<const T>{ch.vrow.data()},
            StridedRows<T>{w.o.data(), dvp}, true);
  });

  for (int l = 0; l < L; ++l) {
    if (w.ln.head[l] < 0) continue;
    const int64_t tok = w.ln.token[l];
    In* dst = static_cast<In*>(p.out.data) + lane_offset(p.out, b, w.ln, l);
    const T sum = w.row_sum[l];
    const T inv = sum > T(0) ? T(1) / sum : T(0);
    const T* orow = w.o.data() + int64_t(l) * dvp;
    for (int d = 0; d < Dv; ++d) dst[d] = from_float<In>(orow[d] * inv);
    const double lse2 = sum > T(0) ? double(w.row_max[l]) + std::log2(double(sum))
                                   : -std::numeric_limits<double>::infinity();
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
//
// A backward task owns one (batch, kv head, section): it recomputes the
// probabilities of its tiles from the saved LSE and accumulates dK/dV (and the
// additional tokens' gradients) into its own buffers, so no two threads add
// to the same memory and results are deterministic for a given thread count.
// Sections split a (batch, kv head) when there are fewer of those than
// threads; their buffers are summed at the end.

template <class In, class T>
void Engine<In, T>::backward_tile(Work& w, int64_t b, int64_t hk, const TileGeometry& g, T* acc_k,
                                  T* acc_v, T* acc_rpb) const {
  const int L = lanes;
  setup_lanes(g, hk, w.ln);
  load_lanes(p.q, b, w.ln, D, qscale, w.q.data(), dp, w.qt.data());
  load_lanes(p.grad_out, b, w.ln, Dv, T(1), w.dor.data(), dvp, w.dot.data());
  load_lanes(p.out, b, w.ln, Dv, T(1), w.o.data(), dvp, nullptr);
  for (int l = 0; l < L; ++l) {
    if (w.ln.head[l] < 0) {
      w.row_max[l] = 0;
      w.delta[l] = 0;
      continue;
    }
    w.row_max[l] = T(double(static_cast<const T*>(
                         p.lse)[(b * p.tokens() + w.ln.token[l]) * p.heads + w.ln.head[l]]) *
                     kLog2e);
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
  fill(w.dq.begin(), w.dq.end(), T(0));
  T* st = w.st.data();
  T* dpt = w.dpt.data();
  const int64_t rs = p.rpb_size();

  for_each_chunk(b, hk, g, w.ln, w.ch, acc_k, acc_v, [&](Chunk& ch) {
    const int n = ch.n;
    gemm<T>(n, L, D, TableRows<const T>{ch.krow.data()}, 1, StridedRows<const T>{w.qt.data(), L},
            StridedRows<T>{st, L}, false);
    // dP^T [n x L] = V_rows [n x Dv] * dO^T [Dv x L]
    gemm<T>(n, L, Dv, TableRows<const T>{ch.vrow.data()}, 1, StridedRows<const T>{w.dot.data(), L},
            StridedRows<T>{dpt, L}, false);
    bias_and_mask(ch, w.ln, st);
    for (int j = 0; j < n; ++j)
      for (int v = 0; v < L; v += W) {
        T* sp = st + int64_t(j) * L + v;
        T* dpp = dpt + int64_t(j) * L + v;
        const V pr = vexp2(vload<V>(sp) - vload<V>(w.row_max.data() + v));
        vstore(sp, pr);                                                    // P^T
        vstore(dpp, pr * (vload<V>(dpp) - vload<V>(w.delta.data() + v)));  // dS^T
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
    gemm<T>(L, dp, n, StridedRows<const T>{dpt, 1}, L, TableRows<const T>{ch.krow.data()},
            StridedRows<T>{w.dq.data(), dp}, true);
    // dK_rows [n x D] += dS^T [n x L] * Q [L x D];  dV_rows += P^T * dO
    gemm<T>(n, dp, L, StridedRows<const T>{dpt, L}, 1, StridedRows<const T>{w.q.data(), dp},
            TableRows<T>{ch.gk.data()}, true);
    gemm<T>(n, dvp, L, StridedRows<const T>{st, L}, 1, StridedRows<const T>{w.dor.data(), dvp},
            TableRows<T>{ch.gv.data()}, true);
  });

  const T qs = T(p.scale);
  for (int l = 0; l < L; ++l) {
    if (w.ln.head[l] < 0) continue;
    In* dst = static_cast<In*>(p.grad_q.data) + lane_offset(p.grad_q, b, w.ln, l);
    const T* row = w.dq.data() + int64_t(l) * dp;
    for (int d = 0; d < D; ++d) dst[d] = from_float<In>(row[d] * qs);
  }
}

template <class In, class T>
void neighborhood_backward(const NeighborhoodProblem& p) {
  const Engine<In, T> eng(p, true);
  const int64_t per_head = eng.sched.tiles_per_head();
  const int64_t pairs = p.batch * p.kv_heads;
  const int64_t threads = max_of<int64_t>(1, p.num_threads);
  const int64_t sections =
      pairs >= 2 * threads ? 1 : min_of<int64_t>((2 * threads + pairs - 1) / pairs, per_head);
  const int64_t tasks = pairs * sections;
  const int64_t tokens = p.tokens(), rows = tokens + p.num_extra;
  const int64_t dp = eng.dp, dvp = eng.dvp, G = eng.group_heads;
  const int64_t rs = p.rpb_size();
  const int64_t rpb_per_task = p.rpb ? G * rs : 0;

  // Accumulators of every task, zeroed at allocation, kept until the reduction.
  Buffer<T> acc_k, acc_v, acc_rpb;
  acc_k.assign(size_t(tasks * rows * dp), T(0));
  acc_v.assign(size_t(tasks * rows * dvp), T(0));
  acc_rpb.assign(size_t(tasks * rpb_per_task), T(0));
  run_parallel(p, tasks, 1, [&](int64_t begin, int64_t end) {
    typename Engine<In, T>::Work w;
    eng.init_work(w, true);
    TileGeometry g;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pair = t / sections, sec = t % sections;
      const int64_t b = pair / p.kv_heads, hk = pair % p.kv_heads;
      const int64_t lo = per_head * sec / sections, hi = per_head * (sec + 1) / sections;
      for (int64_t it = lo; it < hi; ++it)
        if (eng.sched.decode(it, &g))
          eng.backward_tile(w, b, hk, g, acc_k.data() + t * rows * dp,
                            acc_v.data() + t * rows * dvp,
                            p.rpb ? acc_rpb.data() + t * rpb_per_task : nullptr);
    }
  });

  // Sum the sections and write dK, dV (and the additional tokens' gradients),
  // contiguous [B, tokens, H_kv, D]. dK was accumulated against the
  // log2-scaled query, hence the factor ln 2.
  const T kscale = T(kLn2);
  const int64_t D = p.head_dim, Dv = p.value_dim;
  run_parallel(p, pairs * rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t pair = idx / rows, tok = idx % rows;
      const int64_t b = pair / p.kv_heads, hk = pair % p.kv_heads;
      const bool extra = tok >= tokens;
      const int64_t n = extra ? p.num_extra : tokens, i = extra ? tok - tokens : tok;
      In* dk = static_cast<In*>(extra ? p.grad_extra_k.data : p.grad_k.data) +
               ((b * n + i) * p.kv_heads + hk) * D;
      In* dv = static_cast<In*>(extra ? p.grad_extra_v.data : p.grad_v.data) +
               ((b * n + i) * p.kv_heads + hk) * Dv;
      for (int64_t d = 0; d < D; ++d) {
        T sum = 0;
        for (int64_t sec = 0; sec < sections; ++sec)
          sum += acc_k[size_t(((pair * sections + sec) * rows + tok) * dp + d)];
        dk[d] = from_float<In>(sum * kscale);
      }
      for (int64_t d = 0; d < Dv; ++d) {
        T sum = 0;
        for (int64_t sec = 0; sec < sections; ++sec)
          sum += acc_v[size_t(((pair * sections + sec) * rows + tok) * dvp + d)];
        dv[d] = from_float<In>(sum);
      }
    }
  });
  if (p.rpb) {
    T* out = static_cast<T*>(p.grad_rpb);
    fill(out, out + p.heads * rs, T(0));
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t hk = (t / sections) % p.kv_heads;
      for (int64_t hg = 0; hg < G; ++hg)
        for (int64_t e = 0; e < rs; ++e)
          out[(hk * G + hg) * rs + e] += acc_rpb[size_t(t * rpb_per_task + hg * rs + e)];
    }
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
