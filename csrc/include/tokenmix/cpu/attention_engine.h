// The CPU attention engine: fused tiles of queries x tiles of keys with an
// online softmax (forward) and a recompute-from-LSE backward, parameterized by
// a tile schedule and its element mask (here: NeighborhoodSchedule).
//
// Work unit: one query strip for all query heads that share a key/value head
// (GQA/MQA reuse every packed key tile across the group). Keys are visited in
// chunks of up to kChunk columns gathered from the schedule's key rows, packed
// once per chunk into cache-resident buffers, and multiplied with the
// register-blocked GEMM of gemm.h. Memory is O(threads x tile), never
// O(tokens x window).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "tokenmix/attention_problem.h"
#include "tokenmix/cpu/gemm.h"
#include "tokenmix/cpu/simd.h"
#include "tokenmix/neighborhood_schedule.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Strip length along the last dimension: long strips amortize packing and
// fill the GEMM rows, short strips waste fewer keys at the window's edges
// (a strip of s queries visits kernel + s - 1 keys per row).
inline int choose_strip_len(const NeighborhoodProblem& p, int group_heads) {
  const int k = p.dims[2].kernel;
  if (p.dims[2].length == 1) return 1;
  int s = k >= 64 ? 64 : (k >= 16 ? 16 : 8);
  if (group_heads >= 4 && s > 8 && k < 64) s = 8;
  return s;
}

// One key column of a packed chunk.
struct KeyColumn {
  int64_t offset;  // element offset of the key token (without head/feature)
  int64_t token;   // flat token index (num tokens + n for additional tokens)
  int col;         // last-dimension group coordinate (mask), unused for extra
  int rpb_base;    // leading-dimension part of the rpb index
};

template <class In, class T>
struct EngineContext {
  using I = typename Simd<T>::I;
  static constexpr int W = Simd<T>::kWidth;
  static constexpr int kChunk = 256;

  const NeighborhoodProblem& p;
  NeighborhoodSchedule sched;
  int group_heads, strip, rows;  // rows = group_heads * strip
  int dp, dvp;                   // head dims padded to the vector width
  int rpb_dims[3];               // 2k-1 per dimension
  T qscale;                      // softmax scale in log2 units

  explicit EngineContext(const NeighborhoodProblem& prob) : p(prob) {
    group_heads = int(p.heads / p.kv_heads);
    strip = choose_strip_len(p, group_heads);
    sched.init(p.dims, strip);
    rows = group_heads * strip;
    dp = round_up(int(p.head_dim), W);
    dvp = round_up(int(p.value_dim), W);
    for (int t = 0; t < 3; ++t) rpb_dims[t] = 2 * p.dims[t].kernel - 1;
    qscale = T(p.scale * kLog2e);
  }

  int64_t key_offset(const StridedView& view, int64_t b, const StripGeometry& g, int r0, int r1,
                     int c) const {
    return b * view.stride[0] + int64_t(sched.real_coord(g, 0, r0)) * view.stride[1] +
           int64_t(sched.real_coord(g, 1, r1)) * view.stride[2] +
           int64_t(sched.real_coord(g, 2, c)) * view.stride[3];
  }
  int64_t token_index(const StripGeometry& g, int r0, int r1, int c) const {
    return (int64_t(sched.real_coord(g, 0, r0)) * p.dims[1].length +
            sched.real_coord(g, 1, r1)) *
               p.dims[2].length +
           sched.real_coord(g, 2, c);
  }

  // Calls fn(columns, count, is_extra) for each chunk of keys the strip visits.
  template <class Fn>
  void for_each_chunk(int64_t b, const StripGeometry& g, Buffer<KeyColumn>& cols,
                      Fn&& fn) const {
    int n = 0;
    for (int r0 = g.row_begin[0]; r0 < g.row_end[0]; ++r0) {
      for (int r1 = g.row_begin[1]; r1 < g.row_end[1]; ++r1) {
        const int rpb_base =
            ((r0 - g.query[0] + p.dims[0].kernel - 1) * rpb_dims[1] +
             (r1 - g.query[1] + p.dims[1].kernel - 1)) *
            rpb_dims[2];
        const int64_t row_off = key_offset(p.k, b, g, r0, r1, 0);
        const int64_t row_tok = token_index(g, r0, r1, 0);
        const int64_t cstride = int64_t(p.dims[2].dilation) * p.k.stride[3];
        const int64_t tstride = p.dims[2].dilation;
        for (int c = g.col_begin; c < g.col_end; ++c) {
          cols[n++] = KeyColumn{row_off + c * cstride, row_tok + c * tstride, c, rpb_base};
          if (n == kChunk) {
            fn(cols.data(), n, false);
            n = 0;
          }
        }
      }
    }
    if (n > 0) fn(cols.data(), n, false);
    const int64_t tokens = p.tokens();
    for (int64_t e0 = 0; e0 < p.num_extra; e0 += kChunk) {
      const int cnt = int(min_of<int64_t>(kChunk, p.num_extra - e0));
      for (int j = 0; j < cnt; ++j)
        cols[j] = KeyColumn{b * p.extra_k.stride[0] + (e0 + j) * p.extra_k.stride[3],
                            tokens + e0 + j, 0, 0};
      fn(cols.data(), cnt, true);
    }
  }
};

// Workspace of one worker thread.
template <class T>
struct Workspace {
  Buffer<T> q, kt, kr, vr, vt, s, dp, o, dov, acc_q, tmp_a, tmp_b;
  Buffer<T> row_max, row_sum, delta;
  Buffer<typename Simd<T>::I> colc;
  Buffer<int> lo, hi;
  Buffer<KeyColumn> cols;
};

template <class In>
inline const In* ptr(const void* base, int64_t off) {
  return static_cast<const In*>(base) + off;
}

// Loads the strip's queries of the head group into q[rows x dp], times `mult`.
template <class In, class T>
void load_rows(const EngineContext<In, T>& ctx, const StridedView& view, int64_t b, int64_t hk,
               const StripGeometry& g, int dim, int ld, T mult, T* dst) {
  const auto& p = ctx.p;
  const auto& s = ctx.sched;
  const int64_t base = b * view.stride[0] + int64_t(s.real_coord(g, 0, g.query[0])) * view.stride[1] +
                       int64_t(s.real_coord(g, 1, g.query[1])) * view.stride[2];
  for (int hg = 0; hg < ctx.group_heads; ++hg) {
    const int64_t h = hk * ctx.group_heads + hg;
    for (int i = 0; i < ctx.strip; ++i) {
      T* row = dst + int64_t(hg * ctx.strip + i) * ld;
      if (i >= g.count) {
        fill(row, row + ld, T(0));
        continue;
      }
      const In* src = ptr<In>(view.data, base + int64_t(s.real_coord(g, 2, g.first + i)) * view.stride[3] +
                                             h * view.stride[4]);
      for (int d = 0; d < dim; ++d) row[d] = T(to_float(src[d])) * mult;
      fill(row + dim, row + ld, T(0));
    }
  }
  (void)p;
}

// Packs keys as kt[D x ldc] (transposed) and/or kr[n x dp] (row-major).
template <class In, class T>
void pack_keys(const StridedView& view, int64_t hk, int dim, const KeyColumn* cols, int n, int ldc,
               T* kt, T* kr, int ldr, bool extra, const StridedView& extra_view) {
  const StridedView& src_view = extra ? extra_view : view;
  for (int j = 0; j < n; ++j) {
    const In* src = ptr<In>(src_view.data, cols[j].offset + hk * src_view.stride[4]);
    if (kt)
      for (int d = 0; d < dim; ++d) kt[int64_t(d) * ldc + j] = T(to_float(src[d]));
    if (kr) {
      T* row = kr + int64_t(j) * ldr;
      for (int d = 0; d < dim; ++d) row[d] = T(to_float(src[d]));
      fill(row + dim, row + ldr, T(0));
    }
  }
  if (kt)
    for (int d = 0; d < dim; ++d) fill(kt + int64_t(d) * ldc + n, kt + int64_t(d) * ldc + ldc, T(0));
  if (kr)
    for (int j = n; j < ldc; ++j) fill(kr + int64_t(j) * ldr, kr + int64_t(j + 1) * ldr, T(0));
}

// Key offsets in `cols` refer to the key tensor; values use the same token
// coordinates with the value tensor's strides.
inline int64_t value_offset(const NeighborhoodProblem& p, const KeyColumn& c, int64_t b, bool extra) {
  if (extra) {
    const int64_t n = c.token - p.tokens();
    return b * p.extra_v.stride[0] + n * p.extra_v.stride[3];
  }
  const int64_t l2 = p.dims[2].length, l1 = p.dims[1].length;
  const int64_t x2 = c.token % l2, x1 = (c.token / l2) % l1, x0 = c.token / (l2 * l1);
  return b * p.v.stride[0] + x0 * p.v.stride[1] + x1 * p.v.stride[2] + x2 * p.v.stride[3];
}

template <class In, class T>
void pack_values(const NeighborhoodProblem& p, int64_t b, int64_t hk, const KeyColumn* cols, int n,
                 int ldc, bool extra, T* vr, int ldr, T* vt) {
  const StridedView& view = extra ? p.extra_v : p.v;
  const int dim = int(p.value_dim);
  for (int j = 0; j < n; ++j) {
    const In* src = ptr<In>(view.data, value_offset(p, cols[j], b, extra) + hk * view.stride[4]);
    if (vr) {
      T* row = vr + int64_t(j) * ldr;
      for (int d = 0; d < dim; ++d) row[d] = T(to_float(src[d]));
      fill(row + dim, row + ldr, T(0));
    }
    if (vt)
      for (int d = 0; d < dim; ++d) vt[int64_t(d) * ldc + j] = T(to_float(src[d]));
  }
  if (vr)
    for (int j = n; j < ldc; ++j) fill(vr + int64_t(j) * ldr, vr + int64_t(j + 1) * ldr, T(0));
  if (vt)
    for (int d = 0; d < dim; ++d) fill(vt + int64_t(d) * ldc + n, vt + int64_t(d) * ldc + ldc, T(0));
}

// Adds the relative-position bias (log2 units) and applies the element mask to
// one row of scores: columns outside [lo, hi) become -inf.
template <class In, class T>
void bias_and_mask_row(const EngineContext<In, T>& ctx, T* srow, const KeyColumn* cols, int n,
                       int ldc, const typename Simd<T>::I* colc, int lo, int hi, bool extra,
                       const In* rpb_head, int query_col) {
  using V = typename Simd<T>::V;
  using VI = typename Simd<T>::VI;
  constexpr int W = Simd<T>::kWidth;
  const T ninf = -std::numeric_limits<T>::infinity();
  if (rpb_head && !extra) {
    const int off = ctx.p.dims[2].kernel - 1 - query_col;
    for (int j = 0; j < n; ++j)
      srow[j] += T(to_float(rpb_head[cols[j].rpb_base + cols[j].col + off])) * T(kLog2e);
  }
  const VI vlo = vbroadcast<VI>(typename Simd<T>::I(extra ? 0 : lo));
  const VI vhi = vbroadcast<VI>(typename Simd<T>::I(extra ? n : hi));
  const V vninf = vbroadcast<V>(ninf);
  for (int j = 0; j < ldc; j += W) {
    const VI c = vload<VI>(colc + j);
    const V s = vload<V>(srow + j);
    vstore(srow + j, (c >= vlo && c < vhi) ? s : vninf);
  }
}

template <class In, class T>
void prepare_columns(const KeyColumn* cols, int n, int ldc, bool extra,
                     typename Simd<T>::I* colc) {
  using I = typename Simd<T>::I;
  for (int j = 0; j < n; ++j) colc[j] = I(extra ? j : cols[j].col);
  for (int j = n; j < ldc; ++j) colc[j] = std::numeric_limits<I>::max() / 2;
}

// ---------------------------------------------------------------- forward --

template <class In, class T>
void forward_strip(const EngineContext<In, T>& ctx, Workspace<T>& ws, int64_t b, int64_t hk,
                   const StripGeometry& g) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::kWidth;
  const auto& p = ctx.p;
  const int rows = ctx.rows, D = int(p.head_dim), Dv = int(p.value_dim);
  const int dp = ctx.dp, dvp = ctx.dvp;
  const T ninf = -std::numeric_limits<T>::infinity();

  load_rows<In, T>(ctx, p.q, b, hk, g, D, dp, ctx.qscale, ws.q.data());
  fill(ws.o.begin(), ws.o.end(), T(0));
  fill(ws.row_max.begin(), ws.row_max.end(), ninf);
  fill(ws.row_sum.begin(), ws.row_sum.end(), T(0));
  for (int i = 0; i < ctx.strip; ++i) {
    if (i < g.count) ctx.sched.query_interval(g, i, &ws.lo[i], &ws.hi[i]);
    else ws.lo[i] = ws.hi[i] = 0;
  }

  ctx.for_each_chunk(b, g, ws.cols, [&](const KeyColumn* cols, int n, bool extra) {
    const int ldc = round_up(n, W);
    pack_keys<In, T>(p.k, hk, D, cols, n, ldc, ws.kt.data(), nullptr, 0, extra, p.extra_k);
    pack_values<In, T>(p, b, hk, cols, n, ldc, extra, ws.vr.data(), dvp, nullptr);
    prepare_columns<In, T>(cols, n, ldc, extra, ws.colc.data());
    T* S = ws.s.data();
    gemm<T>(rows, ldc, D, ws.q.data(), dp, ws.kt.data(), ldc, S, ldc, false);
    for (int r = 0; r < rows; ++r) {
      const int hg = r / ctx.strip, i = r % ctx.strip;
      T* srow = S + int64_t(r) * ldc;
      if (i >= g.count) {
        fill(srow, srow + ldc, T(0));
        continue;
      }
      const In* rpb_head =
          p.rpb ? static_cast<const In*>(p.rpb) + (hk * ctx.group_heads + hg) * p.rpb_size() : nullptr;
      bias_and_mask_row<In, T>(ctx, srow, cols, n, ldc, ws.colc.data(), ws.lo[i], ws.hi[i], extra,
                               rpb_head, g.first + i);
      V vm = vbroadcast<V>(ninf);
      for (int j = 0; j < ldc; j += W) {
        const V s = vload<V>(srow + j);
        vm = s > vm ? s : vm;
      }
      const T chunk_max = hmax<T>(vm);
      const T old_max = ws.row_max[r];
      const T new_max = chunk_max > old_max ? chunk_max : old_max;
      if (new_max == ninf) {  // nothing visible yet in this row
        fill(srow, srow + ldc, T(0));
        continue;
      }
      const V vnew = vbroadcast<V>(new_max);
      V vs = V{};
      for (int j = 0; j < ldc; j += W) {
        const V e = vexp2(vload<V>(srow + j) - vnew);
        vs += e;
        vstore(srow + j, e);
      }
      const T alpha = old_max == ninf ? T(0) : T(std::exp2(old_max - new_max));
      ws.row_sum[r] = ws.row_sum[r] * alpha + hsum<T>(vs);
      ws.row_max[r] = new_max;
      if (alpha != T(1)) {
        T* orow = ws.o.data() + int64_t(r) * dvp;
        for (int d = 0; d < dvp; ++d) orow[d] *= alpha;
      }
    }
    gemm<T>(rows, dvp, n, S, ldc, ws.vr.data(), dvp, ws.o.data(), dvp, true);
  });

  // Normalize and store.
  using Out = In;
  const auto& s = ctx.sched;
  for (int r = 0; r < rows; ++r) {
    const int hg = r / ctx.strip, i = r % ctx.strip;
    if (i >= g.count) continue;
    const int64_t h = hk * ctx.group_heads + hg;
    const int x0 = s.real_coord(g, 0, g.query[0]), x1 = s.real_coord(g, 1, g.query[1]),
              x2 = s.real_coord(g, 2, g.first + i);
    const T inv = ws.row_sum[r] > T(0) ? T(1) / ws.row_sum[r] : T(0);
    Out* dst = static_cast<Out*>(p.out.data) + b * p.out.stride[0] + x0 * p.out.stride[1] +
               x1 * p.out.stride[2] + x2 * p.out.stride[3] + h * p.out.stride[4];
    const T* orow = ws.o.data() + int64_t(r) * dvp;
    for (int d = 0; d < Dv; ++d) dst[d] = from_float<Out>(orow[d] * inv);
    if (p.lse) {
      const int64_t tok = (int64_t(x0) * p.dims[1].length + x1) * p.dims[2].length + x2;
      const double lse2 = ws.row_sum[r] > T(0) ? double(ws.row_max[r]) + std::log2(double(ws.row_sum[r]))
                                               : -std::numeric_limits<double>::infinity();
      static_cast<T*>(p.lse)[(b * p.tokens() + tok) * p.heads + h] = T(lse2 * kLn2);
    }
  }
}

template <class In, class T>
void init_workspace(const EngineContext<In, T>& ctx, Workspace<T>& ws, bool backward) {
  const int C = EngineContext<In, T>::kChunk;
  const int rows = ctx.rows, dp = ctx.dp, dvp = ctx.dvp;
  const int D = int(ctx.p.head_dim), Dv = int(ctx.p.value_dim);
  ws.q.assign(size_t(rows) * dp, T(0));
  ws.kt.assign(size_t(D) * C, T(0));
  ws.vr.assign(size_t(C) * dvp, T(0));
  ws.s.assign(size_t(rows) * C, T(0));
  ws.o.assign(size_t(rows) * dvp, T(0));
  ws.row_max.assign(rows, T(0));
  ws.row_sum.assign(rows, T(0));
  ws.colc.assign(C, 0);
  ws.lo.assign(ctx.strip, 0);
  ws.hi.assign(ctx.strip, 0);
  ws.cols.assign(C, KeyColumn{});
  if (backward) {
    const int rows_p = round_up(rows, Simd<T>::kWidth);
    ws.kr.assign(size_t(C) * dp, T(0));
    ws.vt.assign(size_t(Dv) * C, T(0));
    ws.dp.assign(size_t(rows) * C, T(0));
    ws.dov.assign(size_t(rows) * dvp, T(0));
    ws.acc_q.assign(size_t(rows) * dp, T(0));
    ws.tmp_a.assign(size_t(C) * max_of(rows_p, max_of(dp, dvp)), T(0));
    ws.tmp_b.assign(size_t(C) * max_of(dp, dvp), T(0));
    ws.delta.assign(rows, T(0));
  }
}

template <class F>
void run_parallel(const NeighborhoodProblem& p, int64_t n, int64_t grain, const F& f) {
  auto tramp = [](int64_t b, int64_t e, void* c) { (*static_cast<const F*>(c))(b, e); };
  p.parallel_for(0, n, grain, tramp, const_cast<void*>(static_cast<const void*>(&f)));
}

template <class In, class T>
void neighborhood_forward(const NeighborhoodProblem& p) {
  EngineContext<In, T> ctx(p);
  const int64_t per_head = ctx.sched.strips_per_head();
  const int64_t total = p.batch * p.kv_heads * per_head;
  run_parallel(p, total, 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws;
    init_workspace(ctx, ws, false);
    StripGeometry g;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / per_head;
      if (!ctx.sched.decode(it % per_head, &g)) continue;
      forward_strip(ctx, ws, bh / p.kv_heads, bh % p.kv_heads, g);
    }
  });
}


// --------------------------------------------------------------- backward --
//
// A backward task owns one (batch, kv head, section): it recomputes the
// probabilities of its strips from the saved LSE and accumulates dK/dV (and the
// additional tokens' gradients) into its own fp32/fp64 buffers, so no two
// threads ever add to the same memory and the result is deterministic for a
// given thread count. Sections split a (batch, kv head) when there are fewer
// of those than threads; their buffers are summed at the end.

template <class T>
struct TaskAccumulators {
  T* dk;    // [(tokens + extra) x D]
  T* dv;    // [(tokens + extra) x Dv]
  T* drpb;  // [group heads x rpb size]
};

template <class In, class T>
void backward_strip(const EngineContext<In, T>& ctx, Workspace<T>& ws, TaskAccumulators<T>& acc,
                    int64_t b, int64_t hk, const StripGeometry& g) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::kWidth;
  const auto& p = ctx.p;
  const int rows = ctx.rows, D = int(p.head_dim), Dv = int(p.value_dim);
  const int dp = ctx.dp, dvp = ctx.dvp;
  const auto& s = ctx.sched;
  const T ninf = -std::numeric_limits<T>::infinity();

  load_rows<In, T>(ctx, p.q, b, hk, g, D, dp, ctx.qscale, ws.q.data());
  load_rows<In, T>(ctx, p.grad_out, b, hk, g, Dv, dvp, T(1), ws.dov.data());
  // o is only needed for delta = rowsum(dO * O); reuse the o buffer.
  load_rows<In, T>(ctx, p.out, b, hk, g, Dv, dvp, T(1), ws.o.data());
  fill(ws.acc_q.begin(), ws.acc_q.end(), T(0));
  const int x0 = s.real_coord(g, 0, g.query[0]), x1 = s.real_coord(g, 1, g.query[1]);
  for (int r = 0; r < rows; ++r) {
    const int hg = r / ctx.strip, i = r % ctx.strip;
    if (i >= g.count) {
      ws.row_max[r] = ninf;
      ws.delta[r] = 0;
      continue;
    }
    const int64_t h = hk * ctx.group_heads + hg;
    const int x2 = s.real_coord(g, 2, g.first + i);
    const int64_t tok = (int64_t(x0) * p.dims[1].length + x1) * p.dims[2].length + x2;
    ws.row_max[r] = T(double(static_cast<const T*>(p.lse)[(b * p.tokens() + tok) * p.heads + h]) * kLog2e);
    T dl = 0;
    const T* orow = ws.o.data() + int64_t(r) * dvp;
    const T* grow = ws.dov.data() + int64_t(r) * dvp;
    for (int d = 0; d < Dv; ++d) dl += orow[d] * grow[d];
    ws.delta[r] = dl;
  }
  for (int i = 0; i < ctx.strip; ++i) {
    if (i < g.count) s.query_interval(g, i, &ws.lo[i], &ws.hi[i]);
    else ws.lo[i] = ws.hi[i] = 0;
  }
  const int rows_p = round_up(rows, W);

  ctx.for_each_chunk(b, g, ws.cols, [&](const KeyColumn* cols, int n, bool extra) {
    const int ldc = round_up(n, W);
    pack_keys<In, T>(p.k, hk, D, cols, n, ldc, ws.kt.data(), ws.kr.data(), dp, extra, p.extra_k);
    pack_values<In, T>(p, b, hk, cols, n, ldc, extra, nullptr, 0, ws.vt.data());
    prepare_columns<In, T>(cols, n, ldc, extra, ws.colc.data());
    T* S = ws.s.data();
    T* dP = ws.dp.data();
    gemm<T>(rows, ldc, D, ws.q.data(), dp, ws.kt.data(), ldc, S, ldc, false);
    gemm<T>(rows, ldc, Dv, ws.dov.data(), dvp, ws.vt.data(), ldc, dP, ldc, false);
    for (int r = 0; r < rows; ++r) {
      const int hg = r / ctx.strip, i = r % ctx.strip;
      T* srow = S + int64_t(r) * ldc;
      T* drow = dP + int64_t(r) * ldc;
      if (i >= g.count || ws.row_max[r] == ninf) {
        fill(srow, srow + ldc, T(0));
        fill(drow, drow + ldc, T(0));
        continue;
      }
      const In* rpb_head =
          p.rpb ? static_cast<const In*>(p.rpb) + (hk * ctx.group_heads + hg) * p.rpb_size() : nullptr;
      bias_and_mask_row<In, T>(ctx, srow, cols, n, ldc, ws.colc.data(), ws.lo[i], ws.hi[i], extra,
                               rpb_head, g.first + i);
      const V vl = vbroadcast<V>(ws.row_max[r]);
      const V vd = vbroadcast<V>(ws.delta[r]);
      for (int j = 0; j < ldc; j += W) {
        const V pr = vexp2(vload<V>(srow + j) - vl);
        vstore(srow + j, pr);                              // P
        vstore(drow + j, pr * (vload<V>(drow + j) - vd));  // dS (natural-log units)
      }
      if (rpb_head && !extra) {
        T* gr = acc.drpb + int64_t(hg) * p.rpb_size();
        const int off = p.dims[2].kernel - 1 - (g.first + i);
        for (int j = 0; j < n; ++j) gr[cols[j].rpb_base + cols[j].col + off] += drow[j];
      }
    }
    // dQ (in units of the scaled query) += dS K
    gemm<T>(rows, dp, n, dP, ldc, ws.kr.data(), dp, ws.acc_q.data(), dp, true);
    // Transpose P and dS to [n x rows] so dK and dV are plain GEMMs.
    T* pt = ws.tmp_a.data();
    T* dst = ws.tmp_b.data();
    for (int j = 0; j < n; ++j)
      for (int r = 0; r < rows_p; ++r) pt[int64_t(j) * rows_p + r] = r < rows ? S[int64_t(r) * ldc + j] : T(0);
    // dV_chunk = P^T dO  -> tmp_b [n x dvp]
    gemm<T>(n, dvp, rows, pt, rows_p, ws.dov.data(), dvp, dst, dvp, false);
    for (int j = 0; j < n; ++j) {
      T* a = acc.dv + cols[j].token * Dv;
      const T* c = dst + int64_t(j) * dvp;
      for (int d = 0; d < Dv; ++d) a[d] += c[d];
    }
    for (int j = 0; j < n; ++j)
      for (int r = 0; r < rows_p; ++r) pt[int64_t(j) * rows_p + r] = r < rows ? dP[int64_t(r) * ldc + j] : T(0);
    // dK_chunk = dS^T Q_scaled -> tmp_b [n x dp]
    gemm<T>(n, dp, rows, pt, rows_p, ws.q.data(), dp, dst, dp, false);
    for (int j = 0; j < n; ++j) {
      T* a = acc.dk + cols[j].token * D;
      const T* c = dst + int64_t(j) * dp;
      for (int d = 0; d < D; ++d) a[d] += c[d];
    }
  });

  // dQ = scale * dS K
  const T qs = T(p.scale);
  for (int r = 0; r < rows; ++r) {
    const int hg = r / ctx.strip, i = r % ctx.strip;
    if (i >= g.count) continue;
    const int64_t h = hk * ctx.group_heads + hg;
    const int x2 = s.real_coord(g, 2, g.first + i);
    In* dst = static_cast<In*>(p.grad_q.data) + b * p.grad_q.stride[0] + x0 * p.grad_q.stride[1] +
              x1 * p.grad_q.stride[2] + x2 * p.grad_q.stride[3] + h * p.grad_q.stride[4];
    const T* arow = ws.acc_q.data() + int64_t(r) * dp;
    for (int d = 0; d < D; ++d) dst[d] = from_float<In>(arow[d] * qs);
  }
}

template <class In, class T>
void neighborhood_backward(const NeighborhoodProblem& p) {
  EngineContext<In, T> ctx(p);
  const int64_t per_head = ctx.sched.strips_per_head();
  const int64_t pairs = p.batch * p.kv_heads;
  const int64_t threads = max_of(1, p.num_threads);
  const int64_t sections = pairs >= 2 * threads ? 1 : min_of<int64_t>((2 * threads + pairs - 1) / pairs, per_head);
  const int64_t tasks = pairs * sections;
  const int64_t rows_total = p.tokens() + p.num_extra;
  const int64_t D = p.head_dim, Dv = p.value_dim, G = ctx.group_heads;
  const bool with_rpb = p.rpb != nullptr;

  // Accumulators of every task, kept until the reduction (zeroed at allocation).
  const int64_t rpb_per_task = with_rpb ? G * p.rpb_size() : 0;
  Buffer<T> all_dk, all_dv, all_drpb;
  all_dk.assign(size_t(tasks * rows_total * D), T(0));
  all_dv.assign(size_t(tasks * rows_total * Dv), T(0));
  all_drpb.assign(size_t(tasks * rpb_per_task), T(0));
  run_parallel(p, tasks, 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws;
    init_workspace(ctx, ws, true);
    StripGeometry g;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pair = t / sections, sec = t % sections;
      const int64_t b = pair / p.kv_heads, hk = pair % p.kv_heads;
      TaskAccumulators<T> acc{all_dk.data() + t * rows_total * D, all_dv.data() + t * rows_total * Dv,
                              all_drpb.data() + t * rpb_per_task};
      const int64_t lo = per_head * sec / sections, hi = per_head * (sec + 1) / sections;
      for (int64_t it = lo; it < hi; ++it)
        if (ctx.sched.decode(it, &g)) backward_strip(ctx, ws, acc, b, hk, g);
    }
  });

  // Reduce sections and write dK, dV (and the additional tokens' gradients).
  const T kscale = T(kLn2);  // dK was accumulated against the log2-scaled query
  const int64_t tokens = p.tokens();
  run_parallel(p, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / p.kv_heads, hk = pair % p.kv_heads;
      for (int64_t tok = 0; tok < rows_total; ++tok) {
        const bool extra = tok >= tokens;
        const StridedView& gk = extra ? p.grad_extra_k : p.grad_k;
        const StridedView& gv = extra ? p.grad_extra_v : p.grad_v;
        const int64_t idx = extra ? tok - tokens : tok;
        // grad buffers are contiguous [B, tokens, Hkv, D]
        In* dk = static_cast<In*>(gk.data) + ((b * (extra ? p.num_extra : tokens) + idx) * p.kv_heads + hk) * D;
        In* dv = static_cast<In*>(gv.data) + ((b * (extra ? p.num_extra : tokens) + idx) * p.kv_heads + hk) * Dv;
        for (int64_t d = 0; d < D; ++d) {
          T sum = 0;
          for (int64_t sec = 0; sec < sections; ++sec) sum += all_dk[size_t(((pair * sections + sec) * rows_total + tok) * D + d)];
          dk[d] = from_float<In>(sum * kscale);
        }
        for (int64_t d = 0; d < Dv; ++d) {
          T sum = 0;
          for (int64_t sec = 0; sec < sections; ++sec) sum += all_dv[size_t(((pair * sections + sec) * rows_total + tok) * Dv + d)];
          dv[d] = from_float<In>(sum);
        }
      }
    }
  });
  if (with_rpb) {
    T* out = static_cast<T*>(p.grad_rpb);
    const int64_t rs = p.rpb_size();
    fill(out, out + p.heads * rs, T(0));
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t hk = (t / sections) % p.kv_heads;
      for (int64_t hg = 0; hg < G; ++hg)
        for (int64_t e = 0; e < rs; ++e) out[(hk * G + hg) * rs + e] += all_drpb[size_t(t * rpb_per_task + hg * rs + e)];
    }
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
