// NeighborhoodPolicy: generalized neighborhood attention as a policy of the CUDA attention engine
// (attention_engine.h).
//
// Query tiles are boxes of NeighborhoodSchedule's tile shape (kTileRows queries of one dilation
// group and one head). A query tile visits its key box (window_union per dimension) in chunks of
// E::kKeys linearized keys, then the additional tokens. A chunk is *full* when every query of the
// tile keeps every key of the chunk: window starts and ends are monotone in the query, so that
// holds when the chunk's bounding box lies inside the window of the tile's last query start and
// its first query's end, per dimension. Other chunks evaluate the window rule per element. The rpb
// is the policy's bias (full chunks add it too) and its gradient the dQ kernel's bias gradient.
// The key-major backward finds the queries that see a key tile with inverse_window_union; the
// same monotonicity makes its query chunks full or partial.
#pragma once

#include <cstdint>
#include <type_traits>

#include "tokenmix/cuda/na_params.h"
#include "tokenmix/cuda/online_softmax.h"
#include "tokenmix/cuda/warp_gemm.h"
#include "tokenmix/neighborhood_schedule.h"
#include "tokenmix/segmented_box.h"

namespace tokenmix::cuda {

namespace na_detail {

// The one row -> coordinates -> offset path: element `index` of the box of group coordinates
// [first, first + ext) of tile geometry g, as group coordinates c and real coordinates x.
TM_DEVICE void box_token(const NaParams& p, const TileGeometry& g, const int* first, const int* ext,
                         int index, int* c, int* x) {
  unravel_box(index, ext, c);
  TM_UNROLL
  for (int t = 0; t < 3; ++t) {
    c[t] += first[t];
    x[t] = p.sched.real_coord(g, t, c[t]);
  }
}
// The same for a segmented box (key boxes of query tiles, query boxes of key tiles).
TM_DEVICE void box_token(const NaParams& p, const TileGeometry& g, const SegmentedBox& box,
                         int index, int* c, int* x) {
  box.coords(index, c);
  TM_UNROLL
  for (int t = 0; t < 3; ++t) x[t] = p.sched.real_coord(g, t, c[t]);
}

// Element offset of the token at real coordinates x from its (batch, head)'s first element, in
// Offset (int32_t only where the host has checked that every such offset fits:
// narrow_key_offsets in na_launch.h).
template <class Offset>
TM_DEVICE Offset token_offset_in_head(const int64_t* st, const int* x) {
  return Offset(x[0]) * Offset(st[1]) + Offset(x[1]) * Offset(st[2]) + Offset(x[2]) * Offset(st[3]);
}

// Element offset of the token at real coordinates x in a [B, S0, S1, S2, H] view.
TM_DEVICE int64_t token_offset(const int64_t* st, int b, const int* x, int head) {
  return int64_t(b) * st[0] + token_offset_in_head<int64_t>(st, x) + int64_t(head) * st[4];
}

TM_DEVICE int token_index(const NaParams& p, const int* x) {
  return (x[0] * p.sched.dims[1].length + x[1]) * p.sched.dims[2].length + x[2];
}

TM_DEVICE const int64_t* strides(const NaParams& p, Operand op) {
  switch (op) {
    case Operand::kQ: return p.q_st;
    case Operand::kK: return p.k_st;
    case Operand::kV: return p.v_st;
    case Operand::kOut: return p.o_st;
    default: return p.go_st;
  }
}

template <class E>
TM_DEVICE float rpb_bias(const NaParams& p, int head, const int* kc, const int* qc) {
  using T = typename E::T;
  global_ptr<const T> rpb(static_cast<const T*>(p.rpb));
  const int i0 = kc[0] - qc[0] + p.sched.dims[0].kernel - 1;
  const int i1 = kc[1] - qc[1] + p.sched.dims[1].kernel - 1;
  const int i2 = kc[2] - qc[2] + p.sched.dims[2].kernel - 1;
  const int64_t idx = (int64_t(i0) * p.rpb_dims[1] + i1) * p.rpb_dims[2] + i2;
  return E::to_float(rpb[int64_t(head) * p.rpb_size + idx]) * kLog2e;
}

}  // namespace na_detail

struct NeighborhoodPolicy {
  using Params = NaParams;

  // Rows of [B, tokens, H] (the delta kernel).
  static TM_DEVICE int64_t query_rows(const NaParams& p) {
    return int64_t(p.batch) * p.tokens * p.heads;
  }
  static TM_DEVICE int64_t row_offset(const NaParams& p, int64_t row, Operand op) {
    const int h = int(row % p.heads), token = int((row / p.heads) % p.tokens);
    const int b = int(row / (int64_t(p.heads) * p.tokens));
    const int e[3] = {p.sched.dims[0].length, p.sched.dims[1].length, p.sched.dims[2].length};
    int x[3];
    unravel_box(token, e, x);
    return na_detail::token_offset(na_detail::strides(p, op), b, x, h);
  }

  // ---- query-major (forward, dQ) ----
  // Offset: the type of the key and value rows' offsets from their (batch, kv head)'s first
  // element (int32_t: a cheaper walk and one shuffle per copied row; only where the host has
  // checked that they fit, see narrow_key_offsets in na_launch.h).
  template <class E, class Offset = int64_t>
  struct QueryTile {
    static_assert(std::is_same_v<Offset, int64_t> || std::is_same_v<Offset, int32_t>,
                  "key rows are int64_t or int32_t offsets");
    using T = typename E::T;
    static constexpr int kKeys = E::kKeys, KC = kKeys / 8;
    static constexpr bool kBiasGrad = true;
    // Two rows per thread: group coordinates and window per dimension.
    struct RowState {
      int qc[2][3], lo[2][3], hi[2][3];
      bool valid[2];
    };
    static TM_HOST_DEVICE int row_ints(const NaParams&) { return 9 * kTileRows; }
    static TM_HOST_DEVICE int key_ints(const NaParams&) { return 4 * kKeys; }  // kc[3], valid
    static TM_HOST_DEVICE bool bias_stage(const NaParams& p) {
      return p.deterministic && p.rpb != nullptr;
    }

    int64_t tile, bh;  // tile within (batch, head); batch * heads + head
    int b, h, hk;      // batch, query head, its kv head
    TileGeometry g;
    int nrows;            // queries in the tile (the rest of the kTileRows rows are padding)
    int spatial, chunks;  // key chunks of the box, all chunks (then the additional tokens)
    int inner;            // keys every query of the tile keeps (the key box's inner box)
    SegmentedBox box;     // the key box, its inner box first
    // The first element of (b, hk) in K, V and the additional keys and values (row_base; held
    // by the int32_t kernels only).
    global_ptr<const T> k_head, v_head, ek_head, ev_head;
    // What load_keys(c) hands load_values(c): this lane's V row offset, found by the same walk.
    struct ValuesRow {
      Offset offset = -1;
    };

    // False past the end of a shorter dilation group (the whole block returns).
    TM_DEVICE bool init(const NaParams& p) {
      tile = int64_t(block_idx().x) % p.tiles_per_head;
      bh = int64_t(block_idx().x) / p.tiles_per_head;
      b = int(bh / p.heads);
      h = int(bh % p.heads);
      hk = h / (p.heads / p.kv_heads);
      if (!p.sched.decode(tile, &g)) return false;
      nrows = g.count[0] * g.count[1] * g.count[2];
      tile_key_box(p.sched, g, &box);
      inner = box.inner();
      spatial = (box.volume() + kKeys - 1) / kKeys;
      chunks = spatial + (p.num_extra + kKeys - 1) / kKeys;
      if constexpr (std::is_same_v<Offset, int32_t>) head_pointers(p);
      return true;
    }
    TM_DEVICE void head_pointers(const NaParams& p) {
      k_head = global_ptr<const T>(static_cast<const T*>(p.k)) +
               (int64_t(b) * p.k_st[0] + int64_t(hk) * p.k_st[4]);
      v_head = global_ptr<const T>(static_cast<const T*>(p.v)) +
               (int64_t(b) * p.v_st[0] + int64_t(hk) * p.v_st[4]);
      ek_head = global_ptr<const T>(static_cast<const T*>(p.extra_k)) +
                (int64_t(b) * p.ek_st[0] + int64_t(hk) * p.ek_st[2]);
      ev_head = global_ptr<const T>(static_cast<const T*>(p.extra_v)) +
                (int64_t(b) * p.ev_st[0] + int64_t(hk) * p.ev_st[2]);
    }
    TM_DEVICE bool extra(int c) const { return c >= spatial; }
    // First key (linear index in the box, or additional token) of chunk c.
    TM_DEVICE int first(int c) const { return (extra(c) ? c - spatial : c) * kKeys; }

    TM_DEVICE int64_t offset(const NaParams& p, int r, Operand op) const {
      if (r >= nrows) return -1;
      int c[3], x[3];
      na_detail::box_token(p, g, g.first, g.count, r, c, x);
      return na_detail::token_offset(na_detail::strides(p, op), b, x, h);
    }
    TM_DEVICE int64_t row(const NaParams& p, int r) const {
      int c[3], x[3];
      na_detail::box_token(p, g, g.first, g.count, r, c, x);
      return (int64_t(b) * p.tokens + na_detail::token_index(p, x)) * p.heads + h;
    }

    // rows[field * kTileRows + r], fields qc[3], lo[3], hi[3].
    TM_DEVICE void write_rows(const NaParams& p, shared_ptr<int> rows) const {
      const int r = int(linear_thread_idx());
      if (r >= kTileRows) return;
      int i[3] = {0, 0, 0};
      if (r < nrows) unravel_box(r, g.count, i);
      for (int t = 0; t < 3; ++t) {
        const int qc = g.first[t] + i[t];
        int lo = 0, hi = 0;  // padding rows see nothing
        if (r < nrows) p.sched.window(g, t, qc, &lo, &hi);
        rows[t * kTileRows + r] = qc;
        rows[(3 + t) * kTileRows + r] = lo;
        rows[(6 + t) * kTileRows + r] = hi;
      }
    }
    TM_DEVICE RowState read_rows(const NaParams&, shared_ptr<int> rows, int row0) const {
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

    // Chunk c is full when all its keys exist and every query's window holds them: it lies in
    // the inner box (or among the additional tokens).
    TM_DEVICE bool full(const NaParams& p, int c) const {
      return first(c) + kKeys <= (extra(c) ? p.num_extra : inner);
    }
    TM_DEVICE bool biased(const NaParams& p, int c) const { return p.rpb && !extra(c); }

    // Key row j of chunk c: its group coordinates (the metadata: the box's first key for a row
    // past the box, 0 for an additional token), whether it exists, and its element offsets in K
    // and V from the tile's (batch, kv head) in them (row_base; -1 when it does not exist). The box
    // walk runs for every row, clamped into the box, and for the additional tokens too, whose
    // offsets are then selected: no row or chunk takes a cheaper path, so the static SASS model's
    // main path is a real chunk's (docs/cuda_engine.md).
    struct KeyRow {
      int kc[3];
      bool valid;
      Offset k, v;
    };
    TM_DEVICE KeyRow key_row(const NaParams& p, int c, int j) const {
      KeyRow kr;
      const int index = first(c) + j, vol = box.volume();
      const bool in_box = index < vol;
      int x[3];
      na_detail::box_token(p, g, box, in_box ? index : 0, kr.kc, x);
      const Offset k = na_detail::token_offset_in_head<Offset>(p.k_st, x);
      const Offset v = na_detail::token_offset_in_head<Offset>(p.v_st, x);
      const bool ex = extra(c);
      kr.valid = ex ? index < p.num_extra : in_box;
      // Only an existing additional token's offset is formed (past them, or for a box key, index
      // times the token stride could leave Offset).
      const int token = ex && kr.valid ? index : 0;
      const Offset ek = Offset(token) * Offset(p.ek_st[1]);
      const Offset ev = Offset(token) * Offset(p.ev_st[1]);
      TM_UNROLL
      for (int t = 0; t < 3; ++t) kr.kc[t] = ex ? 0 : in_box ? kr.kc[t] : g.key_begin[t];
      kr.k = !kr.valid ? -1 : ex ? ek : k;
      kr.v = !kr.valid ? -1 : ex ? ev : v;
      return kr;
    }
    // Metadata (keys[field * kKeys + j], fields kc[3] and valid) and K rows of chunk c. Each lane
    // walks the box for its copy row (warp_row) once, for K and V: it returns the row's V offset,
    // which the engine hands to load_values(c) (ValuesRow).
    template <class Lay>
    TM_DEVICE ValuesRow load_keys(const NaParams& p, int c, shared_ptr<int> keys, shared_ptr<T> sk,
                                  Lay ld, int width) const {
      const int j = warp_row<kKeys>();
      const KeyRow kr = key_row(p, c, j);
      if (int(lane_id()) < kKeys / kWarps) {
        for (int t = 0; t < 3; ++t) keys[t * kKeys + j] = kr.kc[t];
        keys[3 * kKeys + j] = kr.valid ? 1 : 0;
      }
      copy_rows_at<kKeys>(sk, ld, width, row_base(p, c, Operand::kK), 0, p.head_dim, kr.k);
      return ValuesRow{kr.v};
    }
    // The first element of the tile's (batch, kv head) in K or V (op), or in the additional
    // tokens' keys or values for an additional chunk c: key_row's offsets count from there.
    TM_DEVICE global_ptr<const T> row_base(const NaParams& p, int c, Operand op) const {
      const bool k = op == Operand::kK;
      if constexpr (std::is_same_v<Offset, int32_t>) {
        return extra(c) ? (k ? ek_head : ev_head) : (k ? k_head : v_head);
      } else {
        // (the int64_t kernels find them again: the uniform datapath does most of it, and four
        // more pointers in registers made dQ at D=128 reload its row floats from shared memory)
        const bool ex = extra(c);
        const int64_t* st = ex ? (k ? p.ek_st : p.ev_st) : (k ? p.k_st : p.v_st);
        const void* base = ex ? (k ? p.extra_k : p.extra_v) : (k ? p.k : p.v);
        return global_ptr<const T>(static_cast<const T*>(base)) +
               (int64_t(b) * st[0] + int64_t(hk) * (ex ? st[2] : st[4]));
      }
    }
    // Columns [col0, col0 + width) of the V rows of chunk c; vr: what load_keys(c) returned.
    template <class Lay>
    TM_DEVICE void load_values(const NaParams& p, int c, ValuesRow vr, shared_ptr<T> sv, Lay ld,
                               int width, int col0) const {
      const Offset off = vr.offset;
      copy_rows_at<kKeys>(sv, ld, width, row_base(p, c, Operand::kV), col0, p.value_dim,
                          off < 0 ? off : off + Offset(col0));
    }

    // The window rule (partial chunks only; additional tokens: every existing one is kept).
    TM_DEVICE bool keep(const NaParams&, const RowState& rs, int ri, shared_ptr<int> keys, int c,
                        int j) const {
      if (keys[3 * kKeys + j] == 0) return false;
      if (extra(c)) return true;
      bool in = true;
      for (int t = 0; t < 3; ++t) {
        const int kc = keys[t * kKeys + j];
        in = in && kc >= rs.lo[ri][t] && kc < rs.hi[ri][t];
      }
      return in;
    }
    TM_DEVICE float bias(const NaParams& p, const RowState& rs, int ri, shared_ptr<int> keys,
                         int j) const {
      const int kc[3] = {keys[j], keys[kKeys + j], keys[2 * kKeys + j]};
      return na_detail::rpb_bias<E>(p, h, kc, rs.qc[ri]);
    }

    TM_DEVICE bool bias_grad_enabled(const NaParams& p) const {
      return p.rpb != nullptr && block_idx().y == 0;
    }
    // d_rpb += dS of chunk c (s, natural-log logits; exactly 0 where masked): float atomics, or
    // in deterministic mode this tile's own partial row (summed by the rpb reduce kernel).
    TM_DEVICE void bias_grad(const NaParams& p, const float (&s)[KC][4], const RowState& rs,
                             shared_ptr<int> keys, int c, shared_ptr<float> sds) const {
      if (extra(c)) return;
      const int lane = int(lane_id()), warp = int(warp_id()), tid = int(linear_thread_idx());
      if (!p.deterministic) {
        const global_ptr<float> grad_rpb(p.grad_rpb);
        TM_UNROLL
        for (int n = 0; n < KC; ++n) {
          TM_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int ri = i >> 1, j = frag_col(n, i, lane);
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
        return;
      }
      // Deterministic: stage dS, then each rpb offset the chunk can touch is summed by one thread
      // over the tile's queries in a fixed order into this tile's own partial row.
      const global_ptr<float> partial(p.grad_rpb_partial +
                                      (bh * p.tiles_per_head + tile) * p.rpb_size);
      constexpr int lds = kKeys + 1;
      TM_UNROLL
      for (int n = 0; n < KC; ++n) {
        TM_UNROLL
        for (int i = 0; i < 4; ++i)
          sds[(warp * 16 + (lane >> 2) + 8 * (i >> 1)) * lds + frag_col(n, i, lane)] = s[n][i];
      }
      sync_threads();
      const int f = first(c);
      int olo[3], oext[3];
      for (int t = 0; t < 3; ++t) {
        const int kt = p.sched.dims[t].kernel - 1;
        olo[t] = g.key_begin[t] - (g.first[t] + g.count[t] - 1) + kt;
        int ohi = g.key_end[t] - 1 - g.first[t] + kt;
        olo[t] = olo[t] > 0 ? olo[t] : 0;
        ohi = ohi < 2 * kt ? ohi : 2 * kt;
        oext[t] = ohi - olo[t] + 1;
      }
      const int offsets = oext[0] * oext[1] * oext[2];
      for (int e = tid; e < offsets; e += kThreads) {
        int o[3];
        unravel_box(e, oext, o);
        float acc = 0.0f;
        for (int r = 0; r < nrows; ++r) {
          int i[3], key[3];
          unravel_box(r, g.count, i);
          bool in = true;
          for (int t = 0; t < 3; ++t) {
            key[t] = g.first[t] + i[t] + olo[t] + o[t] - (p.sched.dims[t].kernel - 1);
            in = in && key[t] >= g.key_begin[t] && key[t] < g.key_end[t];
          }
          if (!in) continue;
          const int j = box.index_of(key) - f;
          if (j >= 0 && j < kKeys) acc += sds[r * lds + j];
        }
        if (acc != 0.0f) {
          const int64_t idx =
              (int64_t(olo[0] + o[0]) * p.rpb_dims[1] + olo[1] + o[1]) * p.rpb_dims[2] + olo[2] +
              o[2];
          partial[idx] += acc;
        }
      }
    }
  };

  // ---- key-major (dK/dV) ----
  template <class E>
  struct KeyTile {
    using T = typename E::T;
    static constexpr int kCols = E::kKeys;
    struct KeyState {
      int kc[2][3];
      bool valid[2];
    };
    // A step: query head h of the kv head, and the query chunk starting at qfirst.
    struct Step {
      int it, h, qfirst;
      bool full, valid;
    };
    // rows: kc[3] per key, then the query box (16 words, see write_keys).
    static TM_HOST_DEVICE int row_ints(const NaParams&) { return 3 * kTileRows + 16; }
    static TM_HOST_DEVICE int col_ints(const NaParams&) { return 9 * kCols; }

    int b, hk, group_heads;
    bool extra;
    TileGeometry g;  // spatial key tile: group, first, count of the keys
    int nkeys;
    // Queries that see the tile (group coords), inner box first. Set by init; the steps read it
    // back from shared memory (box_smem), which keeps 12 registers free across the step loop.
    SegmentedBox qbox;
    mutable shared_ptr<int> box_smem;
    int nq, inner, qchunks, steps;

    TM_DEVICE bool init(const NaParams& p) {
      const int64_t tiles = p.key_tiles_per_head + p.extra_tiles;
      const int64_t tile = int64_t(block_idx().x) % tiles;
      const int64_t bhk = int64_t(block_idx().x) / tiles;
      b = int(bhk / p.kv_heads);
      hk = int(bhk % p.kv_heads);
      group_heads = p.heads / p.kv_heads;
      extra = tile >= p.key_tiles_per_head;
      g = TileGeometry{};
      int qb[3] = {0, 0, 0}, qe[3] = {1, 1, 1}, jl[3] = {0, 0, 0}, jh[3] = {0, 0, 0};
      if (extra) {
        const int first = int(tile - p.key_tiles_per_head) * kTileRows;
        nkeys = p.num_extra - first < kTileRows ? p.num_extra - first : kTileRows;
        g.first[2] = first;
        qe[2] = p.tokens;
      } else {
        if (!p.sched.decode(tile, &g)) return false;
        nkeys = g.count[0] * g.count[1] * g.count[2];
        for (int t = 0; t < 3; ++t) {
          inverse_window_union(g.first[t], g.first[t] + g.count[t] - 1, g.group_len[t],
                               p.sched.dims[t].kernel, p.sched.dims[t].stride,
                               p.sched.dims[t].causal, &qb[t], &qe[t]);
          qe[t] = qe[t] > qb[t] ? qe[t] : qb[t];
          inner_queries(p, t, qb[t], qe[t], &jl[t], &jh[t]);
        }
      }
      qbox.init(qb, qe, jl, jh);
      nq = qbox.volume();
      inner = qbox.inner();
      qchunks = (nq + kCols - 1) / kCols;
      steps = group_heads * qchunks;
      return true;
    }

    TM_DEVICE global_ptr<const T> source(const NaParams& p, Operand op) const {
      const void* base = op == Operand::kK ? (extra ? p.extra_k : p.k) : (extra ? p.extra_v : p.v);
      return global_ptr<const T>(static_cast<const T*>(base));
    }
    TM_DEVICE int64_t key_offset(const NaParams& p, int r, Operand op) const {
      if (r >= nkeys) return -1;
      if (extra) {
        const int64_t* st = op == Operand::kK ? p.ek_st : p.ev_st;
        return int64_t(b) * st[0] + int64_t(g.first[2] + r) * st[1] + int64_t(hk) * st[2];
      }
      int c[3], x[3];
      na_detail::box_token(p, g, g.first, g.count, r, c, x);
      return na_detail::token_offset(na_detail::strides(p, op), b, x, hk);
    }
    // rows[field * kTileRows + r], fields kc[3] (group coordinates); then the query box (its
    // corners, 12 ints, and its inner box's FastDivisors, 4).
    TM_DEVICE void write_keys(const NaParams&, shared_ptr<int> rows) const {
      const int r = int(linear_thread_idx());
      box_smem = rows + 3 * kTileRows;
      if (r == 0) {  // (constant indices: a register array indexed at run time goes to memory)
        TM_UNROLL
        for (int t = 0; t < 3; ++t) {
          box_smem[t] = qbox.b[t];
          box_smem[3 + t] = qbox.e[t];
          box_smem[6 + t] = qbox.il[t];
          box_smem[9 + t] = qbox.ih[t];
        }
        TM_UNROLL
        for (int d = 0; d < 2; ++d) {
          box_smem[12 + 2 * d] = int(qbox.inner_div[d].m);
          box_smem[13 + 2 * d] = int(qbox.inner_div[d].l);
        }
      }
      if (r >= kTileRows) return;
      int i[3] = {0, 0, 0};
      if (r < nkeys && !extra) unravel_box(r, g.count, i);
      for (int t = 0; t < 3; ++t) rows[t * kTileRows + r] = g.first[t] + i[t];
    }
    TM_DEVICE KeyState read_keys(const NaParams&, shared_ptr<int> rows, int row0) const {
      KeyState s;
      TM_UNROLL
      for (int ri = 0; ri < 2; ++ri) {
        const int r = row0 + 8 * ri;
        s.valid[ri] = r < nkeys;
        for (int t = 0; t < 3; ++t) s.kc[ri][t] = rows[t * kTileRows + r];
      }
      return s;
    }

    // The queries of [qb, qe) in dimension t whose window holds every key of the tile: window
    // ends are non-decreasing, so they start at the first query whose end passes the last key,
    // and starts are non-decreasing, so they stop before the first query whose start passes the
    // first key. Two binary searches.
    TM_DEVICE void inner_queries(const NaParams& p, int t, int qb, int qe, int* lo, int* hi) const {
      const int kf = g.first[t], kl = g.first[t] + g.count[t] - 1;
      for (int pass = 0; pass < 2; ++pass) {
        int a = qb, z = qe;
        while (a < z) {
          const int m = (a + z) / 2;
          int wlo, whi;
          p.sched.window(g, t, m, &wlo, &whi);
          if (pass == 0 ? whi > kl : wlo > kf)
            z = m;
          else
            a = m + 1;
        }
        *(pass == 0 ? lo : hi) = a;
      }
    }
    // Whether every query of the chunk starting at qfirst exists and sees every key of the tile.
    TM_DEVICE bool step_full(const NaParams&, int qfirst) const {
      return qfirst + kCols <= (extra ? nq : inner);
    }
    TM_DEVICE Step step(const NaParams& p, int it) const {
      Step s{};
      s.it = it;
      s.valid = it < steps;
      if (!s.valid) return s;
      s.h = hk * group_heads + it / qchunks;
      s.qfirst = (it % qchunks) * kCols;
      s.full = step_full(p, s.qfirst);
      return s;
    }
    TM_DEVICE Step first(const NaParams& p) const { return step(p, 0); }
    TM_DEVICE Step next(const NaParams& p, const Step& s) const { return step(p, s.it + 1); }

    // Query column j of step st: group coordinates and real coordinates (false past the end; the
    // walk then runs for the first query, so that every column costs the same: see key_row).
    TM_DEVICE bool query_coords(const NaParams& p, const Step& st, int j, int* qc, int* x) const {
      const int index = st.qfirst + j;
      const bool valid = index < nq;
      const int at = valid ? index : 0;
      if (extra) {
        const int e[3] = {p.sched.dims[0].length, p.sched.dims[1].length, p.sched.dims[2].length};
        unravel_box(at, e, x);
        return valid;
      }
      SegmentedBox box;
      TM_UNROLL
      for (int t = 0; t < 3; ++t) {
        box.b[t] = box_smem[t];
        box.e[t] = box_smem[3 + t];
        box.il[t] = box_smem[6 + t];
        box.ih[t] = box_smem[9 + t];
      }
      TM_UNROLL
      for (int d = 0; d < 2; ++d) {
        box.inner_div[d].m = uint32_t(box_smem[12 + 2 * d]);
        box.inner_div[d].l = uint32_t(box_smem[13 + 2 * d]);
      }
      na_detail::box_token(p, g, box, at, qc, x);
      return valid;
    }
    // Query column j of step st, one walk for everything the step needs of it (see key_row):
    // cols[field * kCols + j] (fields qc[3], lo[3], hi[3]: group coordinates and window; 0 past
    // the end) when `write`, and its rows.
    struct QueryCol {
      int64_t row, q, go;  // the LSE / delta row, the Q and dO offsets (-1 past the end)
    };
    TM_DEVICE QueryCol query_col(const NaParams& p, const Step& st, int j, shared_ptr<int> cols,
                                 bool write) const {
      int qc[3] = {0, 0, 0}, x[3];
      const bool valid = query_coords(p, st, j, qc, x);
      const bool windowed = valid && !extra;
      TM_UNROLL
      for (int t = 0; t < 3; ++t) {
        int lo = 0, hi = 0;
        p.sched.window(g, t, qc[t], &lo, &hi);
        if (write) {
          cols[t * kCols + j] = valid ? qc[t] : 0;
          cols[(3 + t) * kCols + j] = windowed ? lo : 0;  // (none past the end: nothing kept)
          cols[(6 + t) * kCols + j] = windowed ? hi : 0;
        }
      }
      QueryCol c;
      c.row = (int64_t(b) * p.tokens + na_detail::token_index(p, x)) * p.heads + st.h;
      c.q = na_detail::token_offset(p.q_st, b, x, st.h);
      c.go = na_detail::token_offset(p.go_st, b, x, st.h);
      if (!valid) c.row = c.q = c.go = -1;
      return c;
    }
    // The step's own metadata: none (each column's comes with query_col).
    TM_DEVICE void write_cols(const NaParams&, const Step&, shared_ptr<int>) const {}
    TM_DEVICE bool keep(const NaParams&, const KeyState& ks, int ri, shared_ptr<int> cols,
                        const Step&, int j) const {
      if (extra) return true;
      bool in = true;
      for (int t = 0; t < 3; ++t)
        in = in && ks.kc[ri][t] >= cols[(3 + t) * kCols + j] &&
             ks.kc[ri][t] < cols[(6 + t) * kCols + j];
      return in;
    }
    TM_DEVICE bool biased(const NaParams& p, const Step&) const { return p.rpb && !extra; }
    TM_DEVICE float bias(const NaParams& p, const KeyState& ks, int ri, shared_ptr<int> cols,
                         const Step& st, int j) const {
      const int qc[3] = {cols[j], cols[kCols + j], cols[2 * kCols + j]};
      return na_detail::rpb_bias<E>(p, st.h, ks.kc[ri], qc);
    }

    TM_DEVICE void* grad(const NaParams& p, Operand op) const {
      return op == Operand::kK ? (extra ? p.grad_extra_k : p.grad_k)
                               : (extra ? p.grad_extra_v : p.grad_v);
    }
    // Row of key r in the contiguous gradients: [B, S.., H_kv] or [B, N, H_kv].
    TM_DEVICE int64_t grad_row(const NaParams& p, int r) const {
      if (extra) return (int64_t(b) * p.num_extra + g.first[2] + r) * p.kv_heads + hk;
      int c[3], x[3];
      na_detail::box_token(p, g, g.first, g.count, r, c, x);
      return (int64_t(b) * p.tokens + na_detail::token_index(p, x)) * p.kv_heads + hk;
    }
  };
};

}  // namespace tokenmix::cuda
