// The CUDA engine of generalized neighborhood attention: fused forward and backward kernels written
// on the SIMT layer, so nvcc compiles them for the GPU and the host compiler runs the very same
// source on the SIMT emulator (the tests). See docs/cuda_engine.md.
//
// Tiling follows the CPU engine and the planner: a block owns one query tile (a box of
// NeighborhoodSchedule's tile shape, kTileRows queries, one head) and visits the key box of that
// tile (window_union per dimension) in chunks of E::kKeys linearized keys, then the additional
// tokens. The element mask is the window rule of window.h, evaluated per (query, key).
//
//   forward          one block per (batch, head, query tile, value chunk): S = Q K^T, online
//                    softmax in log2 units, O += P V; writes O and the LSE.
//   backward_delta   delta = rowsum(dO * O) - grad_lse, one warp per query row.
//   backward_dq      one block per (batch, head, query tile, dQ column chunk): recomputes P from
//                    the LSE, dS = P (dP - delta), dQ += dS K; also the rpb gradient.
//   backward_dkdv    one block per (batch, kv head, key tile, column chunk), keys as rows: visits
//                    the queries that see the tile (inverse_window_union) for every query head of
//                    the kv head, dV += P^T dO, dK += dS^T Q. Extra-token tiles visit all queries.
//   backward_rpb_reduce  deterministic mode: sums per-tile rpb partials in a fixed order.
// dQ, dK and dV are each written by exactly one block: the backward is deterministic except for
// the rpb gradient, which uses float atomics unless `deterministic` is set.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/na_params.h"
#include "tokenmix/cuda/warp_gemm.h"
#include "tokenmix/neighborhood_schedule.h"

namespace tokenmix::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kInf = __builtin_huge_valf();

// ---- shared memory plans (the host sizes the launch with the same functions) -------------------

struct SmemPlan {
  int64_t bytes = 0;
  TM_HOST_DEVICE int64_t take(int64_t n) {
    const int64_t off = (bytes + 15) & ~int64_t(15);
    bytes = off + n;
    return off;
  }
};

// Query-major kernels (forward, backward_dq): a tile of kTileRows queries, chunks of E::kKeys keys.
struct QueryMajorSmem {
  int ldq, ldv;                                       // row strides of the D- and value-wide tiles
  int64_t q, go, k, v, rows, keys, stage, ds, votes;  // byte offsets
  int64_t bytes;
};

// vwidth: value columns held per row (the forward's value chunk; the backward's full Dv).
template <class E>
TM_HOST_DEVICE QueryMajorSmem query_major_smem(int dp, int vwidth, bool backward,
                                               bool rpb_partials) {
  using T = typename E::T;
  QueryMajorSmem s{};
  SmemPlan plan;
  s.ldq = padded_ld<T>(dp);
  s.ldv = padded_ld<T>(vwidth);
  s.q = plan.take(int64_t(kTileRows) * s.ldq * sizeof(T));
  s.go = backward ? plan.take(int64_t(kTileRows) * s.ldv * sizeof(T)) : 0;
  s.k = plan.take(int64_t(E::kKeys) * s.ldq * sizeof(T));
  s.v = plan.take(int64_t(E::kKeys) * s.ldv * sizeof(T));
  s.rows = plan.take(int64_t(kTileRows) * 11 * 4);  // qc[3], lo[3], hi[3], lse2, delta
  s.keys = plan.take(int64_t(E::kKeys) * 4 * 4);    // kc[3], valid
  s.stage = plan.take(int64_t(kWarps) * stage_floats<E>(E::kKeys) * 4);
  s.ds = rpb_partials ? plan.take(int64_t(kTileRows) * (E::kKeys + 1) * 4) : 0;
  s.votes = plan.take(int64_t(2 * kWarps) * 4);  // block_any words: chunk tiles, end of pass
  s.bytes = plan.bytes;
  return s;
}

// Key-major kernel (backward_dkdv): a tile of kTileRows keys, chunks of E::kKeys queries.
struct KeyMajorSmem {
  int ldq, ldv;
  int64_t k, v, q, go, rows, cols, stage, votes;
  int64_t bytes;
};

template <class E>
TM_HOST_DEVICE KeyMajorSmem key_major_smem(int dp, int dvp) {
  using T = typename E::T;
  KeyMajorSmem s{};
  SmemPlan plan;
  s.ldq = padded_ld<T>(dp);
  s.ldv = padded_ld<T>(dvp);
  s.k = plan.take(int64_t(kTileRows) * s.ldq * sizeof(T));
  s.v = plan.take(int64_t(kTileRows) * s.ldv * sizeof(T));
  s.q = plan.take(int64_t(E::kKeys) * s.ldq * sizeof(T));
  s.go = plan.take(int64_t(E::kKeys) * s.ldv * sizeof(T));
  s.rows = plan.take(int64_t(kTileRows) * 4 * 4);  // kc[3], valid
  s.cols = plan.take(int64_t(E::kKeys) * 12 * 4);  // qc[3], lo[3], hi[3], valid, lse2, delta
  s.stage = plan.take(int64_t(kWarps) * stage_floats<E>(E::kKeys) * 4);
  s.votes = plan.take(int64_t(3 * kWarps) * 4);  // block_any words: Q, dO, end of pass
  s.bytes = plan.bytes;
  return s;
}

TM_HOST_DEVICE int round_up_to(int x, int m) {
  return (x + m - 1) / m * m;
}

// Output columns per backward block: kGradChunk, or the whole head when it is narrower.
template <int kDim>
constexpr int grad_chunk = kDim > 0 && kDim < kGradChunk ? kDim : kGradChunk;

// Width of the shared Q/K/V/dO tiles of the backward kernels: the column chunks of dQ, dK and dV
// read whole chunks, so the general path pads both head dims to a multiple of kGradChunk.
template <int kDim>
TM_HOST_DEVICE int grad_tile_width(const NaParams& p) {
  const int widest = p.head_dim > p.value_dim ? p.head_dim : p.value_dim;
  return kDim > 0 ? kDim : round_up_to(widest, kGradChunk);
}

// ---- coordinates -------------------------------------------------------------------------------

// Coordinates of element `index` of a box with extents e[3] (last dimension fastest).
TM_DEVICE void unravel(int index, const int* e, int* c) {
  c[2] = index % e[2];
  index /= e[2];
  c[1] = index % e[1];
  c[0] = index / e[1];
}

// Element offset of the token at real coordinates x in a [B, S0, S1, S2, H] view.
TM_DEVICE int64_t token_offset(const int64_t* st, int b, const int* x, int head) {
  return int64_t(b) * st[0] + int64_t(x[0]) * st[1] + int64_t(x[1]) * st[2] +
         int64_t(x[2]) * st[3] + int64_t(head) * st[4];
}

TM_DEVICE int token_index(const NaParams& p, const int* x) {
  return (x[0] * p.sched.dims[1].length + x[1]) * p.sched.dims[2].length + x[2];
}

// Real coordinates of group coordinates c in tile geometry g.
TM_DEVICE void real_coords(const NaParams& p, const TileGeometry& g, const int* c, int* x) {
  for (int t = 0; t < 3; ++t) x[t] = p.sched.real_coord(g, t, c[t]);
}

// Real coordinates of token index `token`.
TM_DEVICE void token_coords(const NaParams& p, int token, int* x) {
  const int e[3] = {p.sched.dims[0].length, p.sched.dims[1].length, p.sched.dims[2].length};
  unravel(token, e, x);
}

// Copies `rows` rows of `width` elements (a multiple of the 16-byte vector) into a shared tile with
// cp.async, zero-filling columns at or past `valid_cols` and rows without a source (src(r) < 0).
// src(r) is the element offset of row r's column `col0` in `base`.
template <class T, class Src>
TM_DEVICE void copy_rows(shared_ptr<T> dst, int ld, int rows, int width, global_ptr<const T> base,
                         int col0, int valid_cols, Src&& src) {
  constexpr int vec = kVec<T>;
  const int segs = width / vec;
  for (int s = int(linear_thread_idx()); s < rows * segs; s += kThreads) {
    const int r = s / segs, c = (s - r * segs) * vec;
    const int64_t off = src(r);
    const bool in = off >= 0 && col0 + c < valid_cols;
    cp_async_zfill<16>(dst + r * ld + c, in ? base + off + c : base, in ? 16 : 0);
  }
}

// Whether the 16-byte segments this thread copied with copy_rows(dst, ld, rows, width, ...) hold
// an inf or NaN in columns [col_lo, col_hi). It reads only the thread's own cp.async destinations,
// which are visible to it right after cp_async_wait_group, so it runs before the barrier that
// publishes the tile; block_any then combines the threads at that barrier.
template <class E>
TM_DEVICE bool copied_nonfinite(shared_ptr<typename E::T> dst, int ld, int rows, int width,
                                int col_lo, int col_hi) {
  constexpr int vec = kVec<typename E::T>;
  const int segs = width / vec;
  bool bad = false;
  for (int s = int(linear_thread_idx()); s < rows * segs; s += kThreads) {
    const int r = s / segs, c = (s - r * segs) * vec;
    if (c >= col_lo && c < col_hi) bad |= any_nonfinite<E>(load128(dst + r * ld + c));
  }
  return bad;
}

// A block-wide OR taken at a barrier: block_any_vote before it (each warp votes, its lane 0 writes
// the warp's word), block_any_result after it. A set of words may be voted again only after
// another barrier has passed (every thread has read the last result), so the kernels give each
// vote that is not separated from the previous one by a barrier its own set.
TM_DEVICE void block_any_vote(shared_ptr<int> words, bool pred) {
  const int any = any_sync(0xffffffffu, pred ? 1 : 0);
  if (lane_id() == 0) words[warp_id()] = any;
}
TM_DEVICE bool block_any_result(shared_ptr<int> words) {
  int any = 0;
  for (int w = 0; w < kWarps; ++w) any |= words[w];
  return any != 0;
}

// Whether any of a thread's accumulator fragments is inf or NaN (x - x is 0 only for a finite x).
template <int N>
TM_DEVICE bool any_nonfinite_acc(const float (&acc)[N][4]) {
  bool bad = false;
  TM_UNROLL
  for (int n = 0; n < N; ++n) {
    TM_UNROLL
    for (int i = 0; i < 4; ++i) bad |= (acc[n][i] - acc[n][i]) != 0.0f;
  }
  return bad;
}

// Sum / max over the 4 lanes that share an accumulator row.
TM_DEVICE float quad_sum(float v) {
  v += shfl_xor_sync(0xffffffffu, v, 1);
  v += shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
TM_DEVICE float quad_max(float v) {
  const float a = shfl_xor_sync(0xffffffffu, v, 1);
  v = v > a ? v : a;
  const float b = shfl_xor_sync(0xffffffffu, v, 2);
  return v > b ? v : b;
}

template <class E>
TM_DEVICE float rpb_bias(const NaParams& p, int head, const int* kc, const int* qc) {
  using T = typename E::T;
  global_ptr<const T> rpb(static_cast<const T*>(p.rpb));
  const int i0 = kc[0] - qc[0] + p.sched.dims[0].kernel - 1;
  const int i1 = kc[1] - qc[1] + p.sched.dims[1].kernel - 1;
  const int i2 = kc[2] - qc[2] + p.sched.dims[2].kernel - 1;
  const int64_t idx = (int64_t(i0) * p.rpb_dims[1] + i1) * p.rpb_dims[2] + i2;
  return E::to_float(rpb[int64_t(head) * p.rpb_size + idx]);
}

// Per-row state of a query tile kept in registers: the two rows (lane / 4 and lane / 4 + 8 of the
// warp's 16) of every accumulator fragment a thread holds.
struct RowState {
  int qc[2][3], lo[2][3], hi[2][3];
  bool valid[2];
};

// Writes the row metadata of a query tile (group coordinates and windows) to shared memory, as
// rows[field * kTileRows + r] with fields qc[3], lo[3], hi[3].
TM_DEVICE void write_query_rows(const NaParams& p, const TileGeometry& g, int nrows,
                                shared_ptr<int> rows) {
  const int r = int(linear_thread_idx());
  if (r >= kTileRows) return;
  int i[3] = {0, 0, 0};
  if (r < nrows) unravel(r, g.count, i);
  for (int t = 0; t < 3; ++t) {
    const int qc = g.first[t] + i[t];
    int lo = 0, hi = 0;  // padding rows see nothing
    if (r < nrows) p.sched.window(g, t, qc, &lo, &hi);
    rows[t * kTileRows + r] = qc;
    rows[(3 + t) * kTileRows + r] = lo;
    rows[(6 + t) * kTileRows + r] = hi;
  }
}

TM_DEVICE RowState read_query_rows(shared_ptr<int> rows, int row0, int nrows) {
  RowState s;
  TM_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    const int r = row0 + 8 * ri;
    s.valid[ri] = r < nrows;
    for (int t = 0; t < 3; ++t) {
      s.qc[ri][t] = rows[t * kTileRows + r];
      s.lo[ri][t] = rows[(3 + t) * kTileRows + r];
      s.hi[ri][t] = rows[(6 + t) * kTileRows + r];
    }
  }
  return s;
}

// Key chunk metadata: keys[field * kKeys + j], fields kc[3] (group coordinates), valid.
template <int kKeys>
TM_DEVICE void write_key_chunk(const NaParams& p, const TileGeometry& g, bool extra, int first,
                               shared_ptr<int> keys) {
  const int j = int(linear_thread_idx());
  if (j >= kKeys) return;
  const int e[3] = {g.key_end[0] - g.key_begin[0], g.key_end[1] - g.key_begin[1],
                    g.key_end[2] - g.key_begin[2]};
  const int index = first + j;
  int c[3] = {0, 0, 0};
  bool valid;
  if (extra) {
    valid = index < p.num_extra;
  } else {
    valid = index < e[0] * e[1] * e[2];
    if (valid) unravel(index, e, c);
    for (int t = 0; t < 3; ++t) c[t] += g.key_begin[t];
  }
  for (int t = 0; t < 3; ++t) keys[t * kKeys + j] = c[t];
  keys[3 * kKeys + j] = valid ? 1 : 0;
}

// Element offset of key chunk row j in the key tensor (or -1 for an invalid row).
template <int kKeys>
TM_DEVICE int64_t key_row_offset(const NaParams& p, const TileGeometry& g, bool extra, int first,
                                 int j, int b, int hk, const int64_t* st, const int64_t* ext_st) {
  const int index = first + j;
  if (extra) {
    if (index >= p.num_extra) return -1;
    return int64_t(b) * ext_st[0] + int64_t(index) * ext_st[1] + int64_t(hk) * ext_st[2];
  }
  const int e[3] = {g.key_end[0] - g.key_begin[0], g.key_end[1] - g.key_begin[1],
                    g.key_end[2] - g.key_begin[2]};
  if (index >= e[0] * e[1] * e[2]) return -1;
  int c[3], x[3];
  unravel(index, e, c);
  for (int t = 0; t < 3; ++t) c[t] += g.key_begin[t];
  real_coords(p, g, c, x);
  return token_offset(st, b, x, hk);
}

// Element offset of query tile row r (or -1 for a padding row).
TM_DEVICE int64_t query_row_offset(const NaParams& p, const TileGeometry& g, int nrows, int r,
                                   int b, int head, const int64_t* st) {
  if (r >= nrows) return -1;
  int i[3], x[3];
  unravel(r, g.count, i);
  for (int t = 0; t < 3; ++t) i[t] += g.first[t];
  real_coords(p, g, i, x);
  return token_offset(st, b, x, head);
}

TM_DEVICE int query_row_token(const NaParams& p, const TileGeometry& g, int r) {
  int i[3], x[3];
  unravel(r, g.count, i);
  for (int t = 0; t < 3; ++t) i[t] += g.first[t];
  real_coords(p, g, i, x);
  return token_index(p, x);
}

// Scores of a chunk -> logits in log2 units (scaled, biased, masked with -inf). Returns the window
// mask: bit 4n + i set when s[n][i] is kept.
template <class E, int KC>
TM_DEVICE uint32_t mask_logits(const NaParams& p, float (&s)[KC][4], const RowState& rs,
                               shared_ptr<int> keys, bool extra, int head) {
  constexpr int kKeys = E::kKeys;
  const int lane = int(lane_id());
  uint32_t kept = 0;
  TM_UNROLL
  for (int n = 0; n < KC; ++n) {
    TM_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int ri = i >> 1, j = n * 8 + 2 * (lane & 3) + (i & 1);
      bool keep = rs.valid[ri] && keys[3 * kKeys + j] != 0;
      float bias = 0.0f;
      if (keep && !extra) {
        int kc[3];
        for (int t = 0; t < 3; ++t) {
          kc[t] = keys[t * kKeys + j];
          keep = keep && kc[t] >= rs.lo[ri][t] && kc[t] < rs.hi[ri][t];
        }
        if (keep && p.rpb) bias = rpb_bias<E>(p, head, kc, rs.qc[ri]) * kLog2e;
      }
      s[n][i] = keep ? s[n][i] * p.scale_log2 + bias : kNegInf;
      kept |= keep ? 1u << (4 * n + i) : 0u;
    }
  }
  return kept;
}

// The block's place in a query-major grid (grid.x = batch x heads x query tiles) and its tile.
struct QueryTileBlock {
  int64_t tile, bh;  // tile within (batch, head); batch * heads + head
  int b, h, hk;      // batch, query head, its kv head
  TileGeometry g;
  int nrows;  // queries in the tile (the rest of the kTileRows rows are padding)
  // False past the end of a shorter dilation group (the whole block returns).
  TM_DEVICE bool init(const NaParams& p) {
    tile = int64_t(block_idx().x) % p.tiles_per_head;
    bh = int64_t(block_idx().x) / p.tiles_per_head;
    b = int(bh / p.heads);
    h = int(bh % p.heads);
    hk = h / (p.heads / p.kv_heads);
    if (!p.sched.decode(tile, &g)) return false;
    nrows = g.count[0] * g.count[1] * g.count[2];
    return true;
  }
};

// The key chunks a query tile visits: its key box in chunks of E::kKeys linearized keys, then the
// additional tokens. Chunk c's key metadata and K rows are one copy, its V rows another, so that
// the kernels can overlap them with different math.
template <class E>
struct KeyChunks {
  using T = typename E::T;
  static constexpr int kKeys = E::kKeys;
  const NaParams& p;
  const QueryTileBlock& blk;
  int spatial, count;
  global_ptr<const T> k, v, ek, ev;

  TM_DEVICE KeyChunks(const NaParams& params, const QueryTileBlock& block)
      : p(params),
        blk(block),
        k(static_cast<const T*>(params.k)),
        v(static_cast<const T*>(params.v)),
        ek(static_cast<const T*>(params.extra_k)),
        ev(static_cast<const T*>(params.extra_v)) {
    const TileGeometry& g = block.g;
    const int box = (g.key_end[0] - g.key_begin[0]) * (g.key_end[1] - g.key_begin[1]) *
                    (g.key_end[2] - g.key_begin[2]);
    spatial = (box + kKeys - 1) / kKeys;
    count = spatial + (params.num_extra + kKeys - 1) / kKeys;
  }
  TM_DEVICE bool extra(int c) const { return c >= spatial; }
  // First key (linear index in the box, or additional token) of chunk c.
  TM_DEVICE int first(int c) const { return (extra(c) ? c - spatial : c) * kKeys; }
  TM_DEVICE int64_t row(int c, int j, const int64_t* st, const int64_t* extra_st) const {
    return key_row_offset<kKeys>(p, blk.g, extra(c), first(c), j, blk.b, blk.hk, st, extra_st);
  }
  // Metadata and K rows of chunk c (`width` columns of each row).
  TM_DEVICE void load_keys(int c, shared_ptr<int> keys, shared_ptr<T> sk, int ld, int width) const {
    write_key_chunk<kKeys>(p, blk.g, extra(c), first(c), keys);
    copy_rows(sk, ld, kKeys, width, extra(c) ? ek : k, 0, p.head_dim,
              [&](int j) { return row(c, j, p.k_st, p.ek_st); });
  }
  // Columns [col0, col0 + width) of the V rows of chunk c.
  TM_DEVICE void load_values(int c, shared_ptr<T> sv, int ld, int width, int col0) const {
    copy_rows(sv, ld, kKeys, width, extra(c) ? ev : v, col0, p.value_dim, [&](int j) {
      const int64_t off = row(c, j, p.v_st, p.ev_st);
      return off < 0 ? off : off + col0;
    });
  }
};

// ---- forward -----------------------------------------------------------------------------------

// kDim: the head dim when D == Dv == kDim (one value chunk), 0 for the general path (any D, Dv
// multiple of 8 up to 256, value columns in chunks of 64: grid.y).
template <class E, int kDim>
TM_GLOBAL void na_forward_kernel(NaParams p) {
  using T = typename E::T;
  constexpr int kKeys = E::kKeys, KC = kKeys / 8;
  constexpr int kVChunk = kDim > 0 ? kDim : 64;
  constexpr int NV = kVChunk / 8;
  const int lane = int(lane_id()), warp = int(warp_id());
  const int vc0 = int(block_idx().y) * kVChunk;
  QueryTileBlock blk;
  if (!blk.init(p)) return;
  const TileGeometry& g = blk.g;
  const int b = blk.b, h = blk.h, nrows = blk.nrows;
  const int dp = kDim > 0 ? kDim : p.head_dim_padded;
  const QueryMajorSmem L = query_major_smem<E>(dp, kVChunk, false, false);
  const shared_ptr<unsigned char> smem = dynamic_shared<unsigned char>();
  const shared_ptr<T> sq = ptr_cast<T>(smem + L.q), sk = ptr_cast<T>(smem + L.k),
                      sv = ptr_cast<T>(smem + L.v);
  const shared_ptr<int> rows = ptr_cast<int>(smem + L.rows), keys = ptr_cast<int>(smem + L.keys);
  const shared_ptr<int> votes = ptr_cast<int>(smem + L.votes);
  const shared_ptr<float> stage = ptr_cast<float>(smem + L.stage) + warp * stage_floats<E>(kKeys);
  const global_ptr<const T> q(static_cast<const T*>(p.q));
  const KeyChunks<E> chunks(p, blk);
  write_query_rows(p, g, nrows, rows);
  copy_rows(sq, L.ldq, kTileRows, dp, q, 0, p.head_dim,
            [&](int r) { return query_row_offset(p, g, nrows, r, b, h, p.q_st); });

  float o[NV][4], m[2], l[2];
  bool nan_logit[2];  // pass 1: a kept logit of the row was NaN (for the LSE)
  RowState rs{};

  // Pass 0 multiplies P V with tensor cores (or the staged FMAs). A V row holding an inf or NaN
  // would turn the masked (0) P entries of every row into NaN there (0 * inf), so a block whose O
  // came out non-finite runs pass 1: each V tile is checked and the ones with an inf or NaN take
  // gemm_pn_exact. Finite inputs never run pass 1.
  for (int pass = 0; pass < 2; ++pass) {
    const bool exact = pass == 1;
    if (chunks.count > 0) chunks.load_keys(0, keys, sk, L.ldq, dp);
    cp_async_commit_group();  // (with the Q copy in pass 0)
    TM_UNROLL
    for (int n = 0; n < NV; ++n) {
      TM_UNROLL
      for (int i = 0; i < 4; ++i) o[n][i] = 0.0f;
    }
    TM_UNROLL
    for (int ri = 0; ri < 2; ++ri) {
      m[ri] = kNegInf;
      l[ri] = 0.0f;
      nan_logit[ri] = false;
    }

    // Two copies in flight per chunk, one shared tile each: V of chunk c lands while S = Q K^T is
    // computed, K of chunk c + 1 while the softmax and P V run.
    for (int c = 0; c < chunks.count; ++c) {
      const bool extra = chunks.extra(c);
      cp_async_wait_group<0>();  // K (and metadata) of chunk c
      sync_threads();            // ... from every thread; every warp is done with V of chunk c - 1
      chunks.load_values(c, sv, L.ldv, kVChunk, vc0);
      cp_async_commit_group();
      if (c == 0) rs = read_query_rows(rows, warp * 16 + (lane >> 2), nrows);

      float s[KC][4];
      TM_UNROLL
      for (int n = 0; n < KC; ++n) {
        TM_UNROLL
        for (int i = 0; i < 4; ++i) s[n][i] = 0.0f;
      }
      gemm_nt<E>(s, sq + warp * 16 * L.ldq, L.ldq, sk, L.ldq, dp);
      const uint32_t kept = mask_logits<E>(p, s, rs, keys, extra, h);
      cp_async_wait_group<0>();  // V of chunk c
      if (exact) block_any_vote(votes, copied_nonfinite<E>(sv, L.ldv, kKeys, kVChunk, 0, kVChunk));
      sync_threads();  // every warp is done with K and the metadata of chunk c
      const bool v_bad = exact && block_any_result(votes);
      if (c + 1 < chunks.count) chunks.load_keys(c + 1, keys, sk, L.ldq, dp);
      cp_async_commit_group();

      // Online softmax, two rows per thread; l holds this thread's partial row sums.
      TM_UNROLL
      for (int ri = 0; ri < 2; ++ri) {
        float mx = kNegInf;
        TM_UNROLL
        for (int n = 0; n < KC; ++n) {
          mx = mx > s[n][2 * ri] ? mx : s[n][2 * ri];
          mx = mx > s[n][2 * ri + 1] ? mx : s[n][2 * ri + 1];
          if (exact)
            nan_logit[ri] |= s[n][2 * ri] != s[n][2 * ri] || s[n][2 * ri + 1] != s[n][2 * ri + 1];
        }
        mx = quad_max(mx);
        const float m_new = m[ri] > mx ? m[ri] : mx;
        const float base = m_new == kNegInf ? 0.0f : m_new;  // a row with nothing seen yet
        const float alpha = exp2f_approx(m[ri] - base);
        m[ri] = m_new;
        float sum = 0.0f;
        TM_UNROLL
        for (int n = 0; n < KC; ++n) {
          TM_UNROLL
          for (int e = 0; e < 2; ++e) {
            const float pe = exp2f_approx(s[n][2 * ri + e] - base);
            s[n][2 * ri + e] = pe;
            sum += pe;
          }
        }
        l[ri] = l[ri] * alpha + sum;
        TM_UNROLL
        for (int n = 0; n < NV; ++n) {
          o[n][2 * ri] *= alpha;
          o[n][2 * ri + 1] *= alpha;
        }
      }
      if (v_bad)
        gemm_pn_exact<E>(o, s, kept, sv, L.ldv);
      else
        gemm_pn<E>(o, s, sv, L.ldv, stage);
    }
    cp_async_wait_group<0>();  // a tile without any chunk still has its Q copy in flight
    if (exact) break;
    block_any_vote(votes + kWarps, any_nonfinite_acc(o));
    sync_threads();  // every warp is done with the last chunk (pass 1 reloads the tiles)
    if (!block_any_result(votes + kWarps)) break;
  }
  global_ptr<T> out(static_cast<T*>(p.out));
  const global_ptr<float> lse(p.lse);
  TM_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    const float total = quad_sum(l[ri]);
    const bool nan_row = quad_max(nan_logit[ri] ? 1.0f : 0.0f) != 0.0f;
    const int r = warp * 16 + (lane >> 2) + 8 * ri;
    if (r >= nrows) continue;
    // total == 0: no key left (every logit -inf): output 0, LSE -inf.
    const float inv = total == 0.0f ? 0.0f : 1.0f / total;
    const int64_t row = query_row_offset(p, g, nrows, r, b, h, p.o_st);
    TM_UNROLL
    for (int n = 0; n < NV; ++n) {
      TM_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int col = vc0 + n * 8 + 2 * (lane & 3) + e;
        if (col < p.value_dim) out[row + col] = E::from_float(o[n][2 * ri + e] * inv);
      }
    }
    if (vc0 == 0 && (lane & 3) == 0) {
      const int token = query_row_token(p, g, r);
      // As torch.logsumexp: NaN with a NaN logit, else +inf with a +inf logit (either makes O
      // non-finite, so pass 1 ran and recorded the NaN logits).
      lse[(int64_t(b) * p.tokens + token) * p.heads + h] =
          nan_row         ? __builtin_nanf("")
          : m[ri] == kInf ? kInf
          : total == 0.0f ? kNegInf
                          : (m[ri] + log2f_approx(total)) * kLn2;
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------

// delta[b, token, h] = sum_c dO * O - grad_lse: one warp per row.
template <class E>
TM_GLOBAL void na_backward_delta_kernel(NaParams p) {
  using T = typename E::T;
  const int lane = int(lane_id());
  const int64_t row = int64_t(block_idx().x) * kWarps + warp_id();  // (b * tokens + token) * H + h
  const int64_t rows = int64_t(p.batch) * p.tokens * p.heads;
  if (row >= rows) return;
  const int h = int(row % p.heads), token = int((row / p.heads) % p.tokens);
  const int b = int(row / (int64_t(p.heads) * p.tokens));
  int x[3];
  token_coords(p, token, x);
  const global_ptr<const T> go(static_cast<const T*>(p.grad_out)),
      o(static_cast<const T*>(p.out_in));
  const int64_t go_off = token_offset(p.go_st, b, x, h), o_off = token_offset(p.o_st, b, x, h);
  float acc = 0.0f;
  for (int c = lane; c < p.value_dim; c += 32)
    acc += E::to_float(go[go_off + c]) * E::to_float(o[o_off + c]);
  for (int off = 16; off > 0; off >>= 1) acc += shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const global_ptr<float> delta(p.delta);
    float d = acc;
    if (p.grad_lse) d -= global_ptr<const float>(p.grad_lse)[row];
    delta[row] = d;
  }
}

template <class E, int kDim>
TM_GLOBAL void na_backward_dq_kernel(NaParams p) {
  using T = typename E::T;
  constexpr int kKeys = E::kKeys, KC = kKeys / 8;
  constexpr int kChunk = grad_chunk<kDim>;
  constexpr int NQ = kChunk / 8;
  const int lane = int(lane_id()), warp = int(warp_id()), tid = int(linear_thread_idx());
  const int col0 = int(block_idx().y) * kChunk;
  const bool rpb_grad = p.rpb != nullptr && block_idx().y == 0;
  const bool partials = rpb_grad && p.deterministic;
  QueryTileBlock blk;
  if (!blk.init(p)) return;
  const TileGeometry& g = blk.g;
  const int b = blk.b, h = blk.h, nrows = blk.nrows;
  const int64_t tile = blk.tile, bh = blk.bh;
  const int dp = grad_tile_width<kDim>(p), dvp = dp;
  // k extents of S = Q K^T and dP = dO V^T (the tiles are zero past D and Dv)
  const int kq = kDim > 0 ? kDim : p.head_dim_padded;
  const int kv = kDim > 0 ? kDim : p.value_dim_padded;
  const QueryMajorSmem L = query_major_smem<E>(dp, dvp, true, p.deterministic && p.rpb);
  const shared_ptr<unsigned char> smem = dynamic_shared<unsigned char>();
  const shared_ptr<T> sq = ptr_cast<T>(smem + L.q), sgo = ptr_cast<T>(smem + L.go),
                      sk = ptr_cast<T>(smem + L.k), sv = ptr_cast<T>(smem + L.v);
  const shared_ptr<int> rows = ptr_cast<int>(smem + L.rows), keys = ptr_cast<int>(smem + L.keys);
  const shared_ptr<float> rowf = ptr_cast<float>(smem + L.rows) + 9 * kTileRows;  // lse2, delta
  const shared_ptr<int> votes = ptr_cast<int>(smem + L.votes);
  const shared_ptr<float> stage = ptr_cast<float>(smem + L.stage) + warp * stage_floats<E>(kKeys);
  const shared_ptr<float> sds = ptr_cast<float>(smem + L.ds);
  const global_ptr<const T> q(static_cast<const T*>(p.q)), go(static_cast<const T*>(p.grad_out));
  const KeyChunks<E> chunks(p, blk);

  write_query_rows(p, g, nrows, rows);
  if (tid < kTileRows) {
    float lse2 = 0.0f, delta = 0.0f;
    if (tid < nrows) {
      const int64_t row = (int64_t(b) * p.tokens + query_row_token(p, g, tid)) * p.heads + h;
      lse2 = global_ptr<const float>(p.lse_in)[row] * kLog2e;
      delta = global_ptr<const float>(p.delta)[row];
    }
    rowf[tid] = lse2;
    rowf[kTileRows + tid] = delta;
  }
  copy_rows(sq, L.ldq, kTileRows, dp, q, 0, p.head_dim,
            [&](int r) { return query_row_offset(p, g, nrows, r, b, h, p.q_st); });
  copy_rows(sgo, L.ldv, kTileRows, dvp, go, 0, p.value_dim,
            [&](int r) { return query_row_offset(p, g, nrows, r, b, h, p.go_st); });

  float dq[NQ][4];
  RowState rs{};
  float lse2[2] = {0.0f, 0.0f}, delta[2] = {0.0f, 0.0f};
  bool alive[2] = {true, true};  // the row has a key left (LSE > -inf)
  const global_ptr<float> grad_rpb(p.grad_rpb);
  const global_ptr<float> partial(
      partials ? p.grad_rpb_partial + (bh * p.tiles_per_head + tile) * p.rpb_size : nullptr);

  // Pass 0 as the forward's: a block whose dQ came out non-finite computes it again in pass 1,
  // where K tiles with an inf or NaN take gemm_pn_exact (and the rpb gradient, done, is skipped).
  for (int pass = 0; pass < 2; ++pass) {
    const bool exact = pass == 1;
    if (chunks.count > 0) chunks.load_keys(0, keys, sk, L.ldq, dp);
    cp_async_commit_group();  // (with the Q and dO copies in pass 0)
    TM_UNROLL
    for (int n = 0; n < NQ; ++n) {
      TM_UNROLL
      for (int i = 0; i < 4; ++i) dq[n][i] = 0.0f;
    }

    // V of chunk c lands while S = Q K^T is computed (K is needed again for dQ += dS K).
    for (int c = 0; c < chunks.count; ++c) {
      const bool extra = chunks.extra(c);
      const int first = chunks.first(c);
      cp_async_wait_group<0>();  // K (and metadata) of chunk c
      if (exact)
        block_any_vote(votes, copied_nonfinite<E>(sk, L.ldq, kKeys, dp, col0, col0 + kChunk));
      sync_threads();
      const bool k_bad = exact && block_any_result(votes);
      chunks.load_values(c, sv, L.ldv, dvp, 0);
      cp_async_commit_group();
      if (c == 0) {
        const int r0 = warp * 16 + (lane >> 2);
        rs = read_query_rows(rows, r0, nrows);
        TM_UNROLL
        for (int ri = 0; ri < 2; ++ri) {
          lse2[ri] = rowf[r0 + 8 * ri];
          delta[ri] = rowf[kTileRows + r0 + 8 * ri];
          alive[ri] = lse2[ri] != kNegInf;
        }
      }

      float s[KC][4], dp_[KC][4];
      TM_UNROLL
      for (int n = 0; n < KC; ++n) {
        TM_UNROLL
        for (int i = 0; i < 4; ++i) s[n][i] = dp_[n][i] = 0.0f;
      }
      gemm_nt<E>(s, sq + warp * 16 * L.ldq, L.ldq, sk, L.ldq, kq);
      const uint32_t kept = mask_logits<E>(p, s, rs, keys, extra, h);
      cp_async_wait_group<0>();  // V of chunk c
      sync_threads();
      gemm_nt<E>(dp_, sgo + warp * 16 * L.ldv, L.ldv, sv, L.ldv, kv);
      TM_UNROLL
      for (int n = 0; n < KC; ++n) {
        TM_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int ri = i >> 1;
          // dS (natural-log logits) by selection: exactly 0 outside the window and on rows without
          // keys (whose LSE is -inf), whatever dP, delta or the LSE hold there.
          const bool live = ((kept >> (4 * n + i)) & 1u) != 0 && alive[ri];
          s[n][i] = live ? exp2f_approx(s[n][i] - lse2[ri]) * (dp_[n][i] - delta[ri]) : 0.0f;
        }
      }
      if (rpb_grad && !exact && !extra) {
        if (!partials) {
          TM_UNROLL
          for (int n = 0; n < KC; ++n) {
            TM_UNROLL
            for (int i = 0; i < 4; ++i) {
              const int ri = i >> 1, j = n * 8 + 2 * (lane & 3) + (i & 1);
              if (s[n][i] == 0.0f) continue;  // masked (or exactly zero: nothing to add)
              int kc[3];
              for (int t = 0; t < 3; ++t) kc[t] = keys[t * kKeys + j];
              const int i0 = kc[0] - rs.qc[ri][0] + p.sched.dims[0].kernel - 1;
              const int i1 = kc[1] - rs.qc[ri][1] + p.sched.dims[1].kernel - 1;
              const int i2 = kc[2] - rs.qc[ri][2] + p.sched.dims[2].kernel - 1;
              atomic_add(grad_rpb + int64_t(h) * p.rpb_size +
                             (int64_t(i0) * p.rpb_dims[1] + i1) * p.rpb_dims[2] + i2,
                         s[n][i]);
            }
          }
        } else {
          // Deterministic: stage dS, then each rpb offset the chunk can touch is summed by one
          // thread over the tile's queries in a fixed order into this tile's own partial row.
          constexpr int lds = kKeys + 1;
          TM_UNROLL
          for (int n = 0; n < KC; ++n) {
            TM_UNROLL
            for (int i = 0; i < 4; ++i)
              sds[(warp * 16 + (lane >> 2) + 8 * (i >> 1)) * lds + n * 8 + 2 * (lane & 3) +
                  (i & 1)] = s[n][i];
          }
          sync_threads();
          int olo[3], oext[3], ke[3];
          for (int t = 0; t < 3; ++t) {
            const int kt = p.sched.dims[t].kernel - 1;
            olo[t] = g.key_begin[t] - (g.first[t] + g.count[t] - 1) + kt;
            int ohi = g.key_end[t] - 1 - g.first[t] + kt;
            olo[t] = olo[t] > 0 ? olo[t] : 0;
            ohi = ohi < 2 * kt ? ohi : 2 * kt;
            oext[t] = ohi - olo[t] + 1;
            ke[t] = g.key_end[t] - g.key_begin[t];
          }
          const int offsets = oext[0] * oext[1] * oext[2];
          for (int e = tid; e < offsets; e += kThreads) {
            int o[3];
            unravel(e, oext, o);
            float acc = 0.0f;
            for (int r = 0; r < nrows; ++r) {
              int i[3], key[3];
              unravel(r, g.count, i);
              bool in = true;
              for (int t = 0; t < 3; ++t) {
                key[t] = g.first[t] + i[t] + olo[t] + o[t] - (p.sched.dims[t].kernel - 1) -
                         g.key_begin[t];
                in = in && key[t] >= 0 && key[t] < ke[t];
              }
              if (!in) continue;
              const int j = (key[0] * ke[1] + key[1]) * ke[2] + key[2] - first;
              if (j >= 0 && j < kKeys) acc += sds[r * lds + j];
            }
            if (acc != 0.0f) {
              const int64_t idx =
                  (int64_t(olo[0] + o[0]) * p.rpb_dims[1] + olo[1] + o[1]) * p.rpb_dims[2] +
                  olo[2] + o[2];
              partial[idx] += acc;
            }
          }
        }
      }
      sync_warp();  // reconverge after the per-lane rpb code: mma.sync needs all 32 lanes
      if (k_bad)
        gemm_pn_exact<E>(dq, s, kept, sk + col0, L.ldq);
      else
        gemm_pn<E>(dq, s, sk + col0, L.ldq, stage);
      sync_threads();  // every warp is done with K, V and the metadata of chunk c
      if (c + 1 < chunks.count) chunks.load_keys(c + 1, keys, sk, L.ldq, dp);
      cp_async_commit_group();
    }
    cp_async_wait_group<0>();
    if (exact) break;
    block_any_vote(votes + kWarps, any_nonfinite_acc(dq));
    sync_threads();  // every warp is done with the last chunk (pass 1 reloads the tiles)
    if (!block_any_result(votes + kWarps)) break;
  }

  global_ptr<T> gq(static_cast<T*>(p.grad_q));
  TM_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    const int r = warp * 16 + (lane >> 2) + 8 * ri;
    if (r >= nrows) continue;
    int i[3], x[3];
    unravel(r, g.count, i);
    for (int t = 0; t < 3; ++t) i[t] += g.first[t];
    real_coords(p, g, i, x);
    const int64_t row = (int64_t(b) * p.tokens + token_index(p, x)) * p.heads + h;
    TM_UNROLL
    for (int n = 0; n < NQ; ++n) {
      TM_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int col = col0 + n * 8 + 2 * (lane & 3) + e;
        if (col < p.head_dim)
          gq[row * p.head_dim + col] = E::from_float(dq[n][2 * ri + e] * p.scale);
      }
    }
  }
}

// Keys as rows: one block per (batch, kv head, key tile, column chunk); chunk c covers dK columns
// [64c, 64c + 64) and dV columns [64c, 64c + 64).
template <class E, int kDim>
TM_GLOBAL void na_backward_dkdv_kernel(NaParams p) {
  using T = typename E::T;
  constexpr int kCols = E::kKeys, KC = kCols / 8;
  constexpr int kChunk = grad_chunk<kDim>;
  constexpr int NC = kChunk / 8;
  const int lane = int(lane_id()), warp = int(warp_id()), tid = int(linear_thread_idx());
  const int64_t tiles = p.key_tiles_per_head + p.extra_tiles;
  const int64_t tile = int64_t(block_idx().x) % tiles;
  const int64_t bhk = int64_t(block_idx().x) / tiles;
  const int b = int(bhk / p.kv_heads), hk = int(bhk % p.kv_heads);
  const int group_heads = p.heads / p.kv_heads;
  const int col0 = int(block_idx().y) * kChunk;
  const bool extra = tile >= p.key_tiles_per_head;
  TileGeometry g{};  // spatial key tile: group, first, count of the keys
  int nkeys;
  int qbegin[3] = {0, 0, 0}, qext[3] = {1, 1, 1};  // queries that see the tile (group coords)
  if (extra) {
    const int first = int(tile - p.key_tiles_per_head) * kTileRows;
    nkeys = p.num_extra - first < kTileRows ? p.num_extra - first : kTileRows;
    g.first[2] = first;
    qext[2] = p.tokens;
  } else {
    if (!p.sched.decode(tile, &g)) return;
    nkeys = g.count[0] * g.count[1] * g.count[2];
    for (int t = 0; t < 3; ++t) {
      int qe;
      inverse_window_union(g.first[t], g.first[t] + g.count[t] - 1, g.group_len[t],
                           p.sched.dims[t].kernel, p.sched.dims[t].stride, p.sched.dims[t].causal,
                           &qbegin[t], &qe);
      qext[t] = qe > qbegin[t] ? qe - qbegin[t] : 0;
    }
  }
  const int dp = grad_tile_width<kDim>(p), dvp = dp;
  const int kq = kDim > 0 ? kDim : p.head_dim_padded;
  const int kv = kDim > 0 ? kDim : p.value_dim_padded;
  const KeyMajorSmem L = key_major_smem<E>(dp, dvp);
  const shared_ptr<unsigned char> smem = dynamic_shared<unsigned char>();
  const shared_ptr<T> sk = ptr_cast<T>(smem + L.k), sv = ptr_cast<T>(smem + L.v),
                      sq = ptr_cast<T>(smem + L.q), sgo = ptr_cast<T>(smem + L.go);
  const shared_ptr<int> rows = ptr_cast<int>(smem + L.rows), cols = ptr_cast<int>(smem + L.cols);
  const shared_ptr<float> colf = ptr_cast<float>(smem + L.cols) + 10 * kCols;  // lse2, delta
  const shared_ptr<int> votes = ptr_cast<int>(smem + L.votes);  // Q, dO, end (kWarps words each)
  const shared_ptr<float> stage = ptr_cast<float>(smem + L.stage) + warp * stage_floats<E>(kCols);
  const global_ptr<const T> q(static_cast<const T*>(p.q)), k(static_cast<const T*>(p.k)),
      v(static_cast<const T*>(p.v)), ek(static_cast<const T*>(p.extra_k)),
      ev(static_cast<const T*>(p.extra_v)), go(static_cast<const T*>(p.grad_out));

  // Key rows: coordinates (group) and validity; their K and V rows.
  auto key_offset = [&](int r, const int64_t* st, const int64_t* ext_st) -> int64_t {
    if (r >= nkeys) return -1;
    if (extra)
      return int64_t(b) * ext_st[0] + int64_t(g.first[2] + r) * ext_st[1] + int64_t(hk) * ext_st[2];
    int i[3], x[3];
    unravel(r, g.count, i);
    for (int t = 0; t < 3; ++t) i[t] += g.first[t];
    real_coords(p, g, i, x);
    return token_offset(st, b, x, hk);
  };
  if (tid < kTileRows) {
    int i[3] = {0, 0, 0};
    if (tid < nkeys && !extra) unravel(tid, g.count, i);
    for (int t = 0; t < 3; ++t) rows[t * kTileRows + tid] = g.first[t] + i[t];
    rows[3 * kTileRows + tid] = tid < nkeys ? 1 : 0;
  }
  copy_rows(sk, L.ldq, kTileRows, dp, extra ? ek : k, 0, p.head_dim,
            [&](int r) { return key_offset(r, p.k_st, p.ek_st); });
  copy_rows(sv, L.ldv, kTileRows, dvp, extra ? ev : v, 0, p.value_dim,
            [&](int r) { return key_offset(r, p.v_st, p.ev_st); });
  cp_async_commit_group();

  float dk[NC][4], dv[NC][4];
  int kc[2][3];
  bool kvalid[2] = {false, false};

  const int nq = qext[0] * qext[1] * qext[2];
  const int qchunks = (nq + kCols - 1) / kCols;
  const int steps = group_heads * qchunks;  // (query head of the kv head, query chunk)
  // Query column j of the chunk starting at qfirst: group coordinates and real coordinates.
  auto query_coords = [&](int qfirst, int j, int* qc, int* x) -> bool {
    const int index = qfirst + j;
    if (index >= nq) return false;
    if (extra) {
      token_coords(p, index, x);
      return true;
    }
    unravel(index, qext, qc);
    for (int t = 0; t < 3; ++t) qc[t] += qbegin[t];
    real_coords(p, g, qc, x);
    return true;
  };
  auto query_offset = [&](int it, int j, const int64_t* st) -> int64_t {
    int qc[3], x[3];
    if (!query_coords((it % qchunks) * kCols, j, qc, x)) return -1;
    return token_offset(st, b, x, hk * group_heads + it / qchunks);
  };
  // Step it's column metadata (coordinates, windows, LSE, delta) and Q rows; its dO rows are a
  // separate copy.
  auto load_queries = [&](int it) {
    const int h = hk * group_heads + it / qchunks, qfirst = (it % qchunks) * kCols;
    if (tid < kCols) {
      int qc[3] = {0, 0, 0}, x[3];
      const bool valid = query_coords(qfirst, tid, qc, x);
      float lse2 = 0.0f, delta = 0.0f;
      for (int t = 0; t < 3; ++t) {
        int lo = 0, hi = 0;
        if (valid && !extra) p.sched.window(g, t, qc[t], &lo, &hi);
        cols[t * kCols + tid] = qc[t];
        cols[(3 + t) * kCols + tid] = lo;
        cols[(6 + t) * kCols + tid] = hi;
      }
      if (valid) {
        const int64_t row = (int64_t(b) * p.tokens + token_index(p, x)) * p.heads + h;
        lse2 = global_ptr<const float>(p.lse_in)[row] * kLog2e;
        delta = global_ptr<const float>(p.delta)[row];
      }
      cols[9 * kCols + tid] = valid ? 1 : 0;
      colf[tid] = lse2;
      colf[kCols + tid] = delta;
    }
    copy_rows(sq, L.ldq, kCols, dp, q, 0, p.head_dim,
              [&](int j) { return query_offset(it, j, p.q_st); });
  };
  auto load_grads = [&](int it) {
    copy_rows(sgo, L.ldv, kCols, dvp, go, 0, p.value_dim,
              [&](int j) { return query_offset(it, j, p.go_st); });
  };

  // Pass 0 as the forward's: a block whose dK or dV came out non-finite computes them again in
  // pass 1, where Q and dO tiles with an inf or NaN take gemm_pn_exact.
  for (int pass = 0; pass < 2; ++pass) {
    const bool exact = pass == 1;
    if (steps > 0) load_queries(0);
    cp_async_commit_group();  // (with K and V of the tile in pass 0)
    TM_UNROLL
    for (int n = 0; n < NC; ++n) {
      TM_UNROLL
      for (int i = 0; i < 4; ++i) dk[n][i] = dv[n][i] = 0.0f;
    }

    // dO of step it lands while S^T = K Q^T is computed (Q is needed again for dK += dS^T Q).
    for (int it = 0; it < steps; ++it) {
      const int h = hk * group_heads + it / qchunks;
      cp_async_wait_group<0>();  // Q and metadata of step it (and K, V at the first step)
      if (exact)
        block_any_vote(votes, copied_nonfinite<E>(sq, L.ldq, kCols, dp, col0, col0 + kChunk));
      sync_threads();
      const bool q_bad = exact && block_any_result(votes);
      load_grads(it);
      cp_async_commit_group();
      if (it == 0) {
        TM_UNROLL
        for (int ri = 0; ri < 2; ++ri) {
          const int r = warp * 16 + (lane >> 2) + 8 * ri;
          kvalid[ri] = rows[3 * kTileRows + r] != 0;
          for (int t = 0; t < 3; ++t) kc[ri][t] = rows[t * kTileRows + r];
        }
      }

      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x kCols queries.
      float s[KC][4], dpt[KC][4];
      TM_UNROLL
      for (int n = 0; n < KC; ++n) {
        TM_UNROLL
        for (int i = 0; i < 4; ++i) s[n][i] = dpt[n][i] = 0.0f;
      }
      gemm_nt<E>(s, sk + warp * 16 * L.ldq, L.ldq, sq, L.ldq, kq);
      // kept: the window mask; live: kept, and the query has a key left (its LSE, the logit's
      // reference, is > -inf: a row whose logits are all -inf gets P = 0 rather than
      // exp2(-inf - -inf) = NaN).
      uint32_t kept = 0, live = 0;
      TM_UNROLL
      for (int n = 0; n < KC; ++n) {
        TM_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int ri = i >> 1, j = n * 8 + 2 * (lane & 3) + (i & 1);
          bool keep = kvalid[ri] && cols[9 * kCols + j] != 0;
          float bias = 0.0f;
          if (keep && !extra) {
            int qc[3];
            for (int t = 0; t < 3; ++t) {
              qc[t] = cols[t * kCols + j];
              keep = keep && kc[ri][t] >= cols[(3 + t) * kCols + j] &&
                     kc[ri][t] < cols[(6 + t) * kCols + j];
            }
            if (keep && p.rpb) bias = rpb_bias<E>(p, h, kc[ri], qc) * kLog2e;
          }
          const bool alive = keep && colf[j] != kNegInf;
          kept |= keep ? 1u << (4 * n + i) : 0u;
          live |= alive ? 1u << (4 * n + i) : 0u;
          s[n][i] = alive ? exp2f_approx(s[n][i] * p.scale_log2 + bias - colf[j]) : 0.0f;  // P^T
        }
      }
      cp_async_wait_group<0>();  // dO of step it
      if (exact)
        block_any_vote(votes + kWarps,
                       copied_nonfinite<E>(sgo, L.ldv, kCols, dvp, col0, col0 + kChunk));
      sync_threads();
      const bool g_bad = exact && block_any_result(votes + kWarps);
      gemm_nt<E>(dpt, sv + warp * 16 * L.ldv, L.ldv, sgo, L.ldv, kv);
      float ds[KC][4];
      TM_UNROLL
      for (int n = 0; n < KC; ++n) {
        TM_UNROLL
        for (int i = 0; i < 4; ++i)
          ds[n][i] = ((live >> (4 * n + i)) & 1u) != 0  // else exactly 0 (see the dQ kernel)
                         ? s[n][i] * (dpt[n][i] - colf[kCols + n * 8 + 2 * (lane & 3) + (i & 1)])
                         : 0.0f;
      }
      if (g_bad)
        gemm_pn_exact<E>(dv, s, kept, sgo + col0, L.ldv);
      else
        gemm_pn<E>(dv, s, sgo + col0, L.ldv, stage);
      if (q_bad)
        gemm_pn_exact<E>(dk, ds, kept, sq + col0, L.ldq);
      else
        gemm_pn<E>(dk, ds, sq + col0, L.ldq, stage);
      sync_threads();  // every warp is done with Q, dO and the metadata of step it
      if (it + 1 < steps) load_queries(it + 1);
      cp_async_commit_group();
    }
    cp_async_wait_group<0>();
    if (exact) break;
    block_any_vote(votes + 2 * kWarps, any_nonfinite_acc(dk) || any_nonfinite_acc(dv));
    sync_threads();  // every warp is done with the last step (pass 1 reloads Q and dO)
    if (!block_any_result(votes + 2 * kWarps)) break;
  }
  // Gradient rows are contiguous: [B, S.., H_kv, D] or [B, N, H_kv, D] for the extra tokens.
  global_ptr<T> gk(static_cast<T*>(extra ? p.grad_extra_k : p.grad_k)),
      gv(static_cast<T*>(extra ? p.grad_extra_v : p.grad_v));
  TM_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    const int r = warp * 16 + (lane >> 2) + 8 * ri;
    if (r >= nkeys) continue;
    int64_t row;
    if (extra) {
      row = (int64_t(b) * p.num_extra + g.first[2] + r) * p.kv_heads + hk;
    } else {
      int i[3], x[3];
      unravel(r, g.count, i);
      for (int t = 0; t < 3; ++t) i[t] += g.first[t];
      real_coords(p, g, i, x);
      row = (int64_t(b) * p.tokens + token_index(p, x)) * p.kv_heads + hk;
    }
    TM_UNROLL
    for (int n = 0; n < NC; ++n) {
      TM_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int col = col0 + n * 8 + 2 * (lane & 3) + e;
        if (col < p.head_dim)
          gk[row * p.head_dim + col] = E::from_float(dk[n][2 * ri + e] * p.scale);
        if (col < p.value_dim) gv[row * p.value_dim + col] = E::from_float(dv[n][2 * ri + e]);
      }
    }
  }
}

// grad_rpb[h, e] = sum over (batch, tile) of the per-tile partials, in that order.
// (A template so that each backward translation unit owns its instantiation.)
template <class E>
TM_GLOBAL void na_backward_rpb_reduce_kernel(NaParams p) {
  const int64_t index = int64_t(block_idx().x) * kThreads + linear_thread_idx();
  if (index >= int64_t(p.heads) * p.rpb_size) return;
  const int h = int(index / p.rpb_size), e = int(index % p.rpb_size);
  const global_ptr<const float> partial(p.grad_rpb_partial);
  float acc = 0.0f;
  for (int b = 0; b < p.batch; ++b)
    for (int64_t t = 0; t < p.tiles_per_head; ++t)
      acc += partial[((int64_t(b) * p.heads + h) * p.tiles_per_head + t) * p.rpb_size + e];
  global_ptr<float>(p.grad_rpb)[index] = acc;
}

}  // namespace tokenmix::cuda
