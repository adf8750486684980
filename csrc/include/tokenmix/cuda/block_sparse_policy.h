// BlockSparsePolicy: block-sparse attention (FlexAttention BlockMask semantics,
// block_sparse_problem.h) as a policy of the CUDA attention engine (attention_engine.h).
//
// The user's blocks have any size; the kernels work on their own tiles (kTileRows queries or keys)
// and chunks (E::kKeys keys or queries). A schedule kernel translates the layout once per launch:
// for each (layout head, tile) it lists, in increasing order, the chunks that some listed block
// overlaps, each flagged full (every (block, block) pair under the tile x chunk is listed full and
// the chunk lies inside the sequence) or partial. A partial chunk carries a small table, indexed
// by (tile-side block - first tile-side block, chunk-side block - first chunk-side block), that
// says per pair: not listed (-1), full (-2) or the partial block's slot in its query block's kv
// list (>= 0, which locates its bitmask). Partial elements then apply partial_keeps. With bitmasks,
// a partial block counts per chunk by the bits under the tile x chunk: nothing where they keep no
// element (a chunk with nothing else is never visited), full where they keep every element and no
// structured rule applies, partial otherwise. The forward and dQ use the kv-side lists (tiles of
// queries, chunks of keys); dK/dV use the q-side lists (tiles of keys, chunks of queries) and
// visit, per query head of the kv head, its listed chunks.
#pragma once

#include <cstdint>
#include <type_traits>

#include "tokenmix/block_sparse_problem.h"
#include "tokenmix/cuda/attention_params.h"
#include "tokenmix/cuda/tile_io.h"
#include "tokenmix/cuda/warp_gemm.h"

namespace tokenmix::cuda {

// One side's schedule: per (layout head row, tile) a count, `max` entries (chunk << 1 | full)
// and per entry a table of rows x cols int32 codes.
struct BsSchedule {
  const int32_t* count;
  const int32_t* entry;
  const int32_t* table;
  int max;         // entries per tile
  int rows, cols;  // table shape: tile-side blocks x chunk-side blocks
  TM_HOST_DEVICE int table_ints() const { return rows * cols; }
};

struct BsParams : AttentionParams {
  int64_t q_len, kv_len;
  // Element strides (batch, token, head) of [B, T, H, D] views.
  int64_t q_st[3], k_st[3], v_st[3], o_st[3], go_st[3];
  BlockLayoutView layout;
  int q_tiles, key_tiles;  // ceil(q_len / kTileRows), ceil(kv_len / kTileRows)
  // Direct mode of a side: its tiles lie inside one block and its chunks inside one block of the
  // other side (block sizes multiples of the tile and chunk), so the kernels walk the layout's
  // own lists, `per` chunks per listed block, with no schedule. Otherwise the schedule.
  bool direct_q, direct_k;
  int q_per, k_per;  // chunks per listed block in direct mode
  BsSchedule qs;     // query tiles x key chunks (forward, dQ)
  BsSchedule ks;     // key tiles x query chunks (dK/dV)
};

// A chunk of a tile: its first token, whether it is full, and in direct mode the table code of
// its single pair of blocks.
struct BsChunk {
  int64_t first;
  int code;
  bool full;
};

// Schedule-kernel parameters: tiles of `tile_len` along the "row" side, chunks of `chunk_len`
// along the "col" side, and the row side's lists of col blocks.
struct BsScheduleParams {
  int64_t row_len, col_len;  // tokens along each side
  int row_block, col_block;  // block sizes along each side
  int num_row_blocks;        // list rows per layout head row
  int tiles, chunk_len, num_chunks;
  int64_t head_rows;  // layout batch * layout heads
  const int32_t* pcount;
  const int32_t* pindex;
  const int32_t* pslot;  // null: the slot is the list position (kv side)
  const int32_t* fcount;
  const int32_t* findex;
  int maxp, maxf;
  int32_t* count;
  int32_t* entry;
  int32_t* table;
  int max, rows, cols;
  // The bitmasks (layout.mask.bits, null without) and the rule; key_rows: the rows are keys (the
  // q-side lists), so a partial pair's bitmask has the chunk's queries as its rows.
  BlockLayoutView layout;
  bool key_rows;
};

// Whether a bitmask keeps any and every element of its rows [r0, r1) x columns [c0, c1): the
// lanes of a warp split the rows, and every lane gets the answer.
struct BitsSummary {
  bool any, all;
};
TM_DEVICE BitsSummary bits_summary(global_ptr<const uint32_t> bits, int words, int r0, int r1,
                                   int c0, int c1) {
  bool any = false, all = true;
  for (int r = r0 + int(lane_id()); r < r1; r += 32)
    for (int w = c0 >> 5; w <= (c1 - 1) >> 5; ++w) {
      const int lo = c0 - 32 * w > 0 ? c0 - 32 * w : 0, hi = c1 - 32 * w < 32 ? c1 - 32 * w : 32;
      const uint32_t m = (hi == 32 ? ~0u : (1u << hi) - 1u) & (~0u << lo);
      const uint32_t v = bits[int64_t(r) * words + w] & m;
      any = any || v != 0;
      all = all && v == m;
    }
  return {any_sync(0xffffffffu, any) != 0, all_sync(0xffffffffu, all) != 0};
}

TM_HOST_DEVICE int64_t bs_schedule_smem(int num_chunks) {
  return (int64_t(num_chunks) + kThreads + 1) * 4;
}

// One block per (layout head row, tile). Shared memory: one word per chunk (pairs seen: full ones
// in the low 16 bits, partial ones above; then the chunk's entry or -1), then the scan.
TM_DEVICE void bs_schedule(const BsScheduleParams& s) {
  const int tid = int(linear_thread_idx());
  const int64_t lr = int64_t(block_idx().x) / s.tiles;
  const int t = int(int64_t(block_idx().x) % s.tiles);
  const int64_t srow = lr * s.tiles + t;
  const shared_ptr<int> cnt = dynamic_shared<int>();
  const shared_ptr<int> scan = cnt + s.num_chunks;
  const global_ptr<const int32_t> pcount(s.pcount), pindex(s.pindex), pslot(s.pslot),
      fcount(s.fcount), findex(s.findex);
  const global_ptr<int32_t> count(s.count), entry(s.entry), table(s.table);
  for (int c = tid; c < s.num_chunks; c += kThreads) cnt[c] = 0;
  sync_threads();
  const int64_t r0 = int64_t(t) * kTileRows;
  const int64_t r1 = (r0 + kTileRows < s.row_len ? r0 + kTileRows : s.row_len) - 1;
  const int rb0 = int(r0 / s.row_block), nrb = int(r1 / s.row_block) - rb0 + 1;
  const int per = s.maxp + s.maxf;
  // The pairs (tile-side block, list slot), i = first, first + step, ...: calls fn(rbl, list row,
  // slot, col block, full, first chunk, last chunk).
  auto each_pair = [&](int first, int step, auto&& fn) {
    for (int i = first; i < nrb * per; i += step) {
      const int rbl = i / per, si = i - rbl * per;
      const int64_t lrow = lr * s.num_row_blocks + rb0 + rbl;
      const bool full = si >= s.maxp;
      const int slot = full ? si - s.maxp : si;
      if (slot >= (full ? fcount[lrow] : pcount[lrow])) continue;
      const int cb = full ? findex[lrow * s.maxf + slot] : pindex[lrow * s.maxp + slot];
      const int64_t k0 = int64_t(cb) * s.col_block;
      if (cb < 0 || k0 >= s.col_len) continue;  // (the op layer rejects these)
      const int64_t k1 = (k0 + s.col_block < s.col_len ? k0 + s.col_block : s.col_len) - 1;
      fn(rbl, lrow, slot, cb, full, int(k0 / s.chunk_len), int(k1 / s.chunk_len));
    }
  };
  const BlockLayoutView& l = s.layout;
  const bool classify = l.mask.bits != nullptr;
  each_pair(tid, kThreads, [&](int, int64_t, int, int, bool full, int c0, int c1) {
    if (classify && !full) return;  // counted below, chunk by chunk
    for (int c = c0; c <= c1; ++c) atomic_add(cnt + c, full ? 1 : 65536);
  });
  // Partial pairs with bitmasks: a warp per pair reads its bits under the tile x chunk once per
  // chunk (each bit once per launch), so that a chunk where the bits keep nothing is not visited
  // and one where they keep everything (and no structured rule applies) is full.
  const bool structured = l.mask.structured();
  auto count_by_bits = [&](int rbl, int64_t lrow, int slot, int cb, bool full, int c0, int c1) {
    if (full) return;
    // The bitmask is the query block's (kv-side row and slot); its rows are queries.
    const int64_t qrow = s.key_rows ? lr * l.num_q_blocks + cb : lrow;
    const int code = s.pslot ? pslot[lrow * s.maxp + slot] : slot;
    const global_ptr<const uint32_t> bits(l.block_bits(qrow, code));
    // The tile's rows and the chunk's columns inside the pair's blocks.
    const int64_t rs = int64_t(rb0 + rbl) * s.row_block, cs = int64_t(cb) * s.col_block;
    const int ra = int((r0 > rs ? r0 : rs) - rs);
    const int re = int((r1 + 1 < rs + s.row_block ? r1 + 1 : rs + s.row_block) - rs);
    const int64_t ce = cs + s.col_block < s.col_len ? cs + s.col_block : s.col_len;
    for (int c = c0; c <= c1; ++c) {
      const int64_t k0 = int64_t(c) * s.chunk_len, k1 = k0 + s.chunk_len;
      const int ca = int((k0 > cs ? k0 : cs) - cs), cz = int((k1 < ce ? k1 : ce) - cs);
      const BitsSummary b = s.key_rows ? bits_summary(bits, l.mask.words, ca, cz, ra, re)
                                       : bits_summary(bits, l.mask.words, ra, re, ca, cz);
      if (b.any && lane_id() == 0) atomic_add(cnt + c, b.all && !structured ? 1 : 65536);
    }
  };
  if (classify) each_pair(int(warp_id()), kWarps, count_by_bits);
  sync_threads();
  // Compaction in chunk order: each thread takes a contiguous range.
  const int span = (s.num_chunks + kThreads - 1) / kThreads;
  const int cb = tid * span < s.num_chunks ? tid * span : s.num_chunks;
  const int ce = cb + span < s.num_chunks ? cb + span : s.num_chunks;
  int n = 0;
  for (int c = cb; c < ce; ++c) n += cnt[c] != 0 ? 1 : 0;
  scan[tid] = n;
  sync_threads();
  if (tid == 0) {
    int sum = 0;
    for (int i = 0; i < kThreads; ++i) {
      const int v = scan[i];
      scan[i] = sum;
      sum += v;
    }
    scan[kThreads] = sum;
    count[srow] = sum;
  }
  sync_threads();
  int idx = scan[tid];
  const int total = scan[kThreads];
  for (int c = cb; c < ce; ++c) {
    const int v = cnt[c];
    if (v == 0) {
      cnt[c] = -1;
      continue;
    }
    const int64_t k0 = int64_t(c) * s.chunk_len;
    const int64_t kend = k0 + s.chunk_len < s.col_len ? k0 + s.chunk_len : s.col_len;
    const int ncb = int((kend - 1) / s.col_block - k0 / s.col_block) + 1;
    const bool full = (v >> 16) == 0 && (v & 0xffff) == nrb * ncb && k0 + s.chunk_len <= s.col_len;
    entry[srow * s.max + idx] = (c << 1) | (full ? 1 : 0);
    cnt[c] = full ? -1 : idx;
    ++idx;
  }
  const int tsz = s.rows * s.cols;
  for (int i = tid; i < total * tsz; i += kThreads) table[srow * s.max * tsz + i] = -1;
  sync_threads();  // (global writes of the block are visible to it after the barrier)
  // (A partial pair keeps its slot in a partial chunk even where its bits drop or keep every
  // element there: the element rule reads the same bits.)
  each_pair(tid, kThreads, [&](int rbl, int64_t lrow, int slot, int cb, bool full, int c0, int c1) {
    const int code = full ? -2 : s.pslot ? pslot[lrow * s.maxp + slot] : slot;
    for (int c = c0; c <= c1; ++c) {
      const int e = cnt[c];
      if (e < 0) continue;
      const int cbl = cb - int(int64_t(c) * s.chunk_len / s.col_block);
      table[(srow * s.max + e) * tsz + rbl * s.cols + cbl] = code;
    }
  });
}

namespace bs_detail {

TM_DEVICE const int64_t* strides(const BsParams& p, Operand op) {
  switch (op) {
    case Operand::kQ: return p.q_st;
    case Operand::kK: return p.k_st;
    case Operand::kV: return p.v_st;
    case Operand::kOut: return p.o_st;
    default: return p.go_st;
  }
}

TM_DEVICE int64_t token_offset(const int64_t* st, int b, int64_t t, int h) {
  return int64_t(b) * st[0] + t * st[1] + int64_t(h) * st[2];
}

// Copies the table of entry e of schedule row srow into shared memory (plain stores: published
// by the barrier that publishes the chunk's cp.async copies).
TM_DEVICE void load_table(const BsSchedule& s, int64_t srow, int e, shared_ptr<int> dst) {
  const int tsz = s.table_ints();
  const global_ptr<const int32_t> src(s.table + (srow * s.max + e) * int64_t(tsz));
  for (int i = int(linear_thread_idx()); i < tsz; i += kThreads) dst[i] = src[i];
}

// Element (q, k) of a partial chunk whose table says `code` for its pair of blocks.
TM_DEVICE bool keeps(const BsParams& p, int b, int h, int code, int64_t q, int64_t k) {
  if (code == -1) return false;
  if (code == -2) return k < p.kv_len;
  const BlockLayoutView& l = p.layout;
  const int64_t qb = q / l.q_block, kb = k / l.kv_block;
  return partial_keeps(l, b, p.q_len, p.kv_len, l.block_bits(l.q_row(b, h, qb), code),
                       qb * l.q_block, kb * l.kv_block, q, k);
}

}  // namespace bs_detail

struct BlockSparsePolicy {
  using Params = BsParams;

  static TM_DEVICE int64_t query_rows(const BsParams& p) {
    return int64_t(p.batch) * p.q_len * p.heads;
  }
  static TM_DEVICE int64_t row_offset(const BsParams& p, int64_t row, Operand op) {
    const int h = int(row % p.heads);
    const int64_t t = (row / p.heads) % p.q_len;
    const int b = int(row / (int64_t(p.heads) * p.q_len));
    return bs_detail::token_offset(bs_detail::strides(p, op), b, t, h);
  }

  // ---- query-major (forward, dQ): tiles of queries, chunks of keys from the kv-side lists ----
  // (Offset: the engine's type for key-row offsets; block-sparse rows are int64_t offsets.)
  template <class E, class Offset = int64_t>
  struct QueryTile {
    static_assert(std::is_same_v<Offset, int64_t>, "block-sparse key rows are int64_t offsets");
    using T = typename E::T;
    static constexpr int kKeys = E::kKeys, KC = kKeys / 8;
    static constexpr bool kBiasGrad = false;
    struct RowState {
      int64_t q[2];  // query index
      int qbl[2];    // its block, relative to the tile's first
      bool valid[2];
    };
    // keys: the chunk's table, then its first key.
    static TM_HOST_DEVICE int row_ints(const BsParams&) { return 0; }
    static TM_HOST_DEVICE int key_ints(const BsParams& p) { return p.qs.table_ints() + 1; }
    static TM_HOST_DEVICE bool bias_stage(const BsParams&) { return false; }

    int b, h, hk, nrows, chunks;
    int np;            // direct mode: partial blocks listed (then the full ones)
    int64_t q0, srow;  // first query; schedule row (direct mode: the layout row)

    TM_DEVICE bool init(const BsParams& p) {
      const int t = int(int64_t(block_idx().x) % p.q_tiles);
      const int64_t bh = int64_t(block_idx().x) / p.q_tiles;
      b = int(bh / p.heads);
      h = int(bh % p.heads);
      hk = h / (p.heads / p.kv_heads);
      q0 = int64_t(t) * kTileRows;
      nrows = int(p.q_len - q0 < kTileRows ? p.q_len - q0 : kTileRows);
      if (p.direct_q) {
        const BlockLayoutView& l = p.layout;
        srow = l.q_row(b, h, q0 / l.q_block);
        np = global_ptr<const int32_t>(l.partial_count)[srow];
        chunks = (np + global_ptr<const int32_t>(l.full_count)[srow]) * p.q_per;
      } else {
        srow = p.layout.head_row(b, h) * p.q_tiles + t;
        np = 0;
        chunks = global_ptr<const int32_t>(p.qs.count)[srow];
      }
      return true;
    }
    TM_DEVICE BsChunk chunk(const BsParams& p, int c) const {
      BsChunk r;
      if (!p.direct_q) {
        const int e = global_ptr<const int32_t>(p.qs.entry)[srow * p.qs.max + c];
        r.first = int64_t(e >> 1) * kKeys;
        r.full = (e & 1) != 0;
        r.code = 0;
        return r;
      }
      // Listed block e / per (partial ones first), its chunk e % per. A chunk past the end of a
      // ragged last block holds no key: partial, and keep() drops every element.
      const BlockLayoutView& l = p.layout;
      const int e = c / p.q_per, sub = c - e * p.q_per;
      int kb;
      if (e < np) {
        kb = global_ptr<const int32_t>(l.partial_index)[srow * l.max_partial + e];
        r.code = e;
      } else {
        kb = global_ptr<const int32_t>(l.full_index)[srow * l.max_full + e - np];
        r.code = -2;
      }
      r.first = int64_t(kb) * l.kv_block + int64_t(sub) * kKeys;
      r.full = e >= np && r.first + kKeys <= p.kv_len;
      return r;
    }
    TM_DEVICE int64_t offset(const BsParams& p, int r, Operand op) const {
      return r < nrows ? bs_detail::token_offset(bs_detail::strides(p, op), b, q0 + r, h) : -1;
    }
    TM_DEVICE int64_t row(const BsParams& p, int r) const {
      return (int64_t(b) * p.q_len + q0 + r) * p.heads + h;
    }
    TM_DEVICE void write_rows(const BsParams&, shared_ptr<int>) const {}
    TM_DEVICE RowState read_rows(const BsParams& p, shared_ptr<int>, int row0) const {
      RowState s;
      const int64_t qb0 = q0 / p.layout.q_block;
      TM_UNROLL
      for (int ri = 0; ri < 2; ++ri) {
        const int r = row0 + 8 * ri;
        s.valid[ri] = r < nrows;
        s.q[ri] = q0 + r;
        s.qbl[ri] = s.valid[ri] ? int((q0 + r) / p.layout.q_block - qb0) : 0;
      }
      return s;
    }
    TM_DEVICE bool full(const BsParams& p, int c) const { return chunk(p, c).full; }
    TM_DEVICE bool biased(const BsParams&, int) const { return false; }

    // What load_keys(c) hands load_values(c): nothing, a V row's offset costs less to find again
    // (one product) than to keep in registers across the chunk's scores.
    struct ValuesRow {};
    // Metadata and K rows of chunk c.
    template <class Lay>
    TM_DEVICE ValuesRow load_keys(const BsParams& p, int c, shared_ptr<int> keys, shared_ptr<T> sk,
                                  Lay ld, int width) const {
      const BsChunk ch = chunk(p, c);
      const int64_t k0 = ch.first;
      if (!ch.full) {
        if (!p.direct_q)
          bs_detail::load_table(p.qs, srow, c, keys);
        else if (linear_thread_idx() == 0)
          keys[0] = ch.code;
        if (linear_thread_idx() == 0) keys[p.qs.table_ints()] = int(k0);
      }
      copy_rows<kKeys>(sk, ld, width, global_ptr<const T>(static_cast<const T*>(p.k)), 0,
                       p.head_dim, [&](int j) {
                         return k0 + j < p.kv_len ? bs_detail::token_offset(p.k_st, b, k0 + j, hk)
                                                  : -1;
                       });
      return {};
    }
    // Columns [col0, col0 + width) of the V rows of chunk c.
    template <class Lay>
    TM_DEVICE void load_values(const BsParams& p, int c, ValuesRow, shared_ptr<T> sv, Lay ld,
                               int width, int col0) const {
      const int64_t k0 = chunk(p, c).first;
      copy_rows<kKeys>(
          sv, ld, width, global_ptr<const T>(static_cast<const T*>(p.v)), col0, p.value_dim,
          [&](int j) {
            return k0 + j < p.kv_len ? bs_detail::token_offset(p.v_st, b, k0 + j, hk) + col0 : -1;
          });
    }
    TM_DEVICE bool keep(const BsParams& p, const RowState& rs, int ri, shared_ptr<int> keys, int,
                        int j) const {
      const int64_t k0 = keys[p.qs.table_ints()], k = k0 + j;
      if (k >= p.kv_len) return false;
      const int kbl = int(k / p.layout.kv_block - k0 / p.layout.kv_block);
      return bs_detail::keeps(p, b, h, keys[rs.qbl[ri] * p.qs.cols + kbl], rs.q[ri], k);
    }
    TM_DEVICE float bias(const BsParams&, const RowState&, int, shared_ptr<int>, int) const {
      return 0.0f;
    }
    TM_DEVICE bool bias_grad_enabled(const BsParams&) const { return false; }
    TM_DEVICE void bias_grad(const BsParams&, const float (&)[KC][4], const RowState&,
                             shared_ptr<int>, int, shared_ptr<float>) const {}
  };

  // ---- key-major (dK/dV): tiles of keys, chunks of queries from the q-side lists ----
  template <class E>
  struct KeyTile {
    using T = typename E::T;
    static constexpr int kCols = E::kKeys;
    struct KeyState {
      int64_t k[2];
      int kbl[2];  // its block, relative to the tile's first
      bool valid[2];
    };
    // Query head gh of the kv head's group, entry e of its list for this key tile.
    struct Step {
      int gh, e, count, h, code;
      int64_t srow, qfirst;
      bool full, valid;
    };
    // cols: the chunk's table, then its first query.
    static TM_HOST_DEVICE int row_ints(const BsParams&) { return 0; }
    static TM_HOST_DEVICE int col_ints(const BsParams& p) { return p.ks.table_ints() + 1; }

    int b, hk, group_heads, u, nkeys;
    int64_t k0;

    TM_DEVICE bool init(const BsParams& p) {
      u = int(int64_t(block_idx().x) % p.key_tiles);
      const int64_t bhk = int64_t(block_idx().x) / p.key_tiles;
      b = int(bhk / p.kv_heads);
      hk = int(bhk % p.kv_heads);
      group_heads = p.heads / p.kv_heads;
      k0 = int64_t(u) * kTileRows;
      nkeys = int(p.kv_len - k0 < kTileRows ? p.kv_len - k0 : kTileRows);
      return true;
    }
    TM_DEVICE global_ptr<const T> source(const BsParams& p, Operand op) const {
      return global_ptr<const T>(static_cast<const T*>(op == Operand::kK ? p.k : p.v));
    }
    TM_DEVICE int64_t key_offset(const BsParams& p, int r, Operand op) const {
      return r < nkeys ? bs_detail::token_offset(bs_detail::strides(p, op), b, k0 + r, hk) : -1;
    }
    TM_DEVICE void write_keys(const BsParams&, shared_ptr<int>) const {}
    TM_DEVICE KeyState read_keys(const BsParams& p, shared_ptr<int>, int row0) const {
      KeyState s;
      const int64_t kb0 = k0 / p.layout.kv_block;
      TM_UNROLL
      for (int ri = 0; ri < 2; ++ri) {
        const int r = row0 + 8 * ri;
        s.valid[ri] = r < nkeys;
        s.k[ri] = k0 + r;
        s.kbl[ri] = s.valid[ri] ? int((k0 + r) / p.layout.kv_block - kb0) : 0;
      }
      return s;
    }

    // The first step at or after (gh, e), skipping heads with nothing listed.
    TM_DEVICE Step seek(const BsParams& p, int gh, int e) const {
      Step s{};
      for (; gh < group_heads; ++gh, e = 0) {
        const int h = hk * group_heads + gh;
        const BlockLayoutView& l = p.layout;
        int64_t srow;
        int count, np = 0;
        if (p.direct_k) {
          srow = l.kv_row(b, h, k0 / l.kv_block);
          np = global_ptr<const int32_t>(l.q_partial_count)[srow];
          count = (np + global_ptr<const int32_t>(l.q_full_count)[srow]) * p.k_per;
        } else {
          srow = l.head_row(b, h) * p.key_tiles + u;
          count = global_ptr<const int32_t>(p.ks.count)[srow];
        }
        if (e < count) {
          s.gh = gh;
          s.e = e;
          s.count = count;
          s.h = h;
          s.srow = srow;
          s.valid = true;
          if (p.direct_k) {  // as QueryTile::chunk, on the q-side lists
            const int ei = e / p.k_per, sub = e - ei * p.k_per;
            int qb;
            if (ei < np) {
              qb = global_ptr<const int32_t>(l.q_partial_index)[srow * l.max_q_partial + ei];
              s.code = global_ptr<const int32_t>(l.q_partial_slot)[srow * l.max_q_partial + ei];
            } else {
              qb = global_ptr<const int32_t>(l.q_full_index)[srow * l.max_q_full + ei - np];
              s.code = -2;
            }
            s.qfirst = int64_t(qb) * l.q_block + int64_t(sub) * kCols;
            s.full = ei >= np && s.qfirst + kCols <= p.q_len;
          } else {
            const int en = global_ptr<const int32_t>(p.ks.entry)[srow * p.ks.max + e];
            s.qfirst = int64_t(en >> 1) * kCols;
            s.full = (en & 1) != 0;
            s.code = 0;
          }
          return s;
        }
      }
      return s;
    }
    TM_DEVICE Step first(const BsParams& p) const { return seek(p, 0, 0); }
    TM_DEVICE Step next(const BsParams& p, const Step& s) const { return seek(p, s.gh, s.e + 1); }

    struct QueryCol {
      int64_t row, q, go;  // the LSE / delta row, the Q and dO offsets (-1 past the end)
    };
    TM_DEVICE QueryCol query_col(const BsParams& p, const Step& st, int j, shared_ptr<int>,
                                 bool) const {
      const int64_t q = st.qfirst + j;
      const bool in = q < p.q_len;  // (selected, not branched: see NeighborhoodPolicy::key_row)
      const int64_t row = (int64_t(b) * p.q_len + q) * p.heads + st.h;
      const int64_t oq = bs_detail::token_offset(bs_detail::strides(p, Operand::kQ), b, q, st.h);
      const int64_t og =
          bs_detail::token_offset(bs_detail::strides(p, Operand::kGradOut), b, q, st.h);
      return {in ? row : -1, in ? oq : -1, in ? og : -1};
    }
    TM_DEVICE void write_cols(const BsParams& p, const Step& st, shared_ptr<int> cols) const {
      if (st.full) return;
      if (!p.direct_k)
        bs_detail::load_table(p.ks, st.srow, st.e, cols);
      else if (linear_thread_idx() == 0)
        cols[0] = st.code;
      if (linear_thread_idx() == 0) cols[p.ks.table_ints()] = int(st.qfirst);
    }
    TM_DEVICE bool keep(const BsParams& p, const KeyState& ks, int ri, shared_ptr<int> cols,
                        const Step& st, int j) const {
      const int64_t qf = cols[p.ks.table_ints()], q = qf + j;
      const int qbl = int(q / p.layout.q_block - qf / p.layout.q_block);
      return bs_detail::keeps(p, b, st.h, cols[ks.kbl[ri] * p.ks.cols + qbl], q, ks.k[ri]);
    }
    TM_DEVICE bool biased(const BsParams&, const Step&) const { return false; }
    TM_DEVICE float bias(const BsParams&, const KeyState&, int, shared_ptr<int>, const Step&,
                         int) const {
      return 0.0f;
    }
    TM_DEVICE void* grad(const BsParams& p, Operand op) const {
      return op == Operand::kK ? p.grad_k : p.grad_v;
    }
    TM_DEVICE int64_t grad_row(const BsParams& p, int r) const {
      return (int64_t(b) * p.kv_len + k0 + r) * p.kv_heads + hk;
    }
  };
};

}  // namespace tokenmix::cuda
