// The policy of the CPU attention engine for block-sparse attention
// (block_sparse_problem.h).
//
// Lanes are query rows of one query block: of one head, or, when the layout is
// the same for every query head of a kv head (layout heads 1 or H_kv) and K/V
// are shared (GQA), of all the query heads of one kv head, so every key/value
// row a tile reads serves all of them. A tile's chunks are the key rows of its query block's listed
// kv blocks, partial blocks first, then full ones: consecutive blocks of the same kind are merged
// into one chunk up to kChunk keys and larger blocks are split. Keys at or past kv_len are cut off
// when chunks are built, so a full chunk needs no mask work at all; partial chunks evaluate the
// element rule with vector compares (band/prefix, document ids, bitmask bits).
#pragma once

#include <cstdint>

#include "tokenmix/block_sparse_problem.h"
#include "tokenmix/cpu/attention_engine.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

// Keys and values as rows of T: the caller's tensor (same dtype, rows readable
// as whole vectors) or a converted copy [B, H_kv, Tk, padded dim].
template <class T>
struct TokenRows {
  const T* base = nullptr;
  int64_t batch_stride = 0, token_stride = 0, head_stride = 0;

  const T* row(int64_t b, int64_t hk, int64_t t) const {
    return base + b * batch_stride + t * token_stride + hk * head_stride;
  }
};

template <class In, class T>
void convert_token_rows(const BlockSparseProblem& p, const TokenView& src, int dim, int padded,
                        Buffer<T>& out, TokenRows<T>& rows) {
  const int64_t tk = p.kv_len;
  out.allocate(size_t(p.batch * p.kv_heads * tk * padded), /*large=*/true);
  T* dst = out.data();
  // Rows are visited in the source's order: heads-last sources (heads adjacent) are read
  // sequentially, writing one sequential stream per kv head.
  const bool heads_inner = p.kv_heads > 1 && src.head_stride < src.token_stride;
  const int64_t hk_n = p.kv_heads, per_batch = hk_n * tk;
  run_parallel(p, p.batch * per_batch, 256, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / per_batch, i = idx % per_batch;
      const int64_t t = heads_inner ? i / hk_n : i % tk;
      const int64_t hk = heads_inner ? i % hk_n : i / tk;
      const In* s = static_cast<const In*>(src.data) + src.offset(b, t, hk);
      T* row = dst + (b * per_batch + hk * tk + t) * padded;
      for (int d = 0; d < dim; ++d) row[d] = T(to_float(s[d]));
      fill(row + dim, row + padded, T(0));
    }
  });
  rows.base = dst;
  rows.batch_stride = p.kv_heads * tk * padded;
  rows.token_stride = padded;
  rows.head_stride = tk * padded;
}

// Where a backward tile adds its dK and dV rows: key t at k + t * k_ld (v + t * v_ld).
template <class T>
struct KeyGradRows {
  T *k = nullptr, *v = nullptr;
  int64_t k_ld = 0, v_ld = 0;
};

struct BlockSparseTile {
  int64_t b = 0;
  int64_t head = 0;  // first query head of the tile
  int64_t hk = 0;    // its kv head
  int qb = 0;        // query block
  int first = 0;     // first row of the tile inside the query block
  int rows = 0;      // query rows per head (the rest of the lanes are padding)
};

// OR and AND over `rows` rows of `words` bitmask words (contiguous): any[w], all[w]. The rows
// are one run of rows x words words; when a vector holds whole rows (words divides its lanes)
// the run is folded a vector at a time, lane i holding word i % words. (A scalar loop over
// rows with any/all in memory measured 5% of the random 10% pattern's forward at BLOCK_SIZE
// 128: each row's OR waits for the previous row's store.)
inline void fold_rows(const uint32_t* run, int rows, int words, uint32_t* any, uint32_t* all) {
  constexpr int kLanes = TOKENMIX_VEC_BYTES / 4;
  const int64_t count = int64_t(rows) * words;
  if (kLanes % words != 0) {
    for (int w = 0; w < words; ++w) {
      uint32_t a = 0u, b = ~0u;
      for (int r = 0; r < rows; ++r) {
        a |= run[int64_t(r) * words + w];
        b &= run[int64_t(r) * words + w];
      }
      any[w] = a;
      all[w] = b;
    }
    return;
  }
  vint32 va = vbroadcast<vint32>(0), vb = vbroadcast<vint32>(-1);
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    const vint32 x = vload<vint32>(run + i);
    va |= x;
    vb &= x;
  }
  int32_t la[kLanes], lb[kLanes];
  vstore(la, va);
  vstore(lb, vb);
  for (int w = 0; w < words; ++w) {
    uint32_t a = 0u, b = ~0u;
    for (int j = w; j < kLanes; j += words) {
      a |= uint32_t(la[j]);
      b &= uint32_t(lb[j]);
    }
    any[w] = a;
    all[w] = b;
  }
  for (; i < count; ++i) {  // i starts at a multiple of kLanes, so of words
    any[i % words] |= run[i];
    all[i % words] &= run[i];
  }
}

template <class InT, class TT>
struct BlockSparsePolicy {
  using In = InT;
  using T = TT;
  using Tile = BlockSparseTile;
  using GradTarget = KeyGradRows<T>;
  using V = typename Simd<T>::V;
  using VI = typename Simd<T>::VI;
  using I = typename Simd<T>::I;
  static constexpr int W = Simd<T>::kWidth;
  // Keys per chunk and query rows x heads per tile: four vectors of lanes let both GEMMs use
  // the widest register block (6 x 4 vectors), and with 64 keys S^T, Q^T and O each stay
  // within 16 KiB (fp32, AVX-512) so a chunk's working set fits in L1 with its K/V rows.
  static constexpr int kChunk = 64;
  static constexpr int kTargetLanes = 4 * W;

  struct Lanes : LaneTable<T> {
    Buffer<I> query;  // query token per lane
    Buffer<I> doc;    // document id per lane (document rule)
    Buffer<int> row;  // row inside the query block (-1: padding lane)
  };

  struct Chunk : ChunkRows<T> {
    Buffer<I> key;              // key token per column (partial chunks)
    Buffer<I> key_doc;          // document id per column (document rule)
    Buffer<int> word;           // the column's bitmask word: a [lanes] vector of lane_words
    Buffer<int> bit;            // the column's bit in that word
    Buffer<I> lane_words;       // [slots x lanes]: one bitmask word per lane
    Buffer<int64_t> full_keys;  // keys of bitmask blocks that every row of the tile keeps
    Buffer<uint32_t> any_bits;  // per word of a bitmask block: OR over the tile's rows
    Buffer<uint32_t> all_bits;  // ... and AND
  };

  const BlockSparseProblem& p;
  const BlockLayoutView& lay;
  AttentionTensors io;
  int64_t group;       // query heads per kv head
  int64_t tile_heads;  // query heads sharing the lanes of a tile (group or 1)
  int64_t units;       // tile_heads-wide head groups per batch
  int rows_per_tile, tiles_per_block, L;
  int dp, dvp;
  // Element rule, with the band clamped to int range of I (differences k - q are within
  // [-q_len, kv_len]).
  bool band = false, docs = false, bits = false;
  I band_lo = 0, band_hi = 0;
  int64_t prefix = 0;
  bool prefix_causal = false;
  TokenRows<T> keys, values;
  Buffer<T> key_copy, value_copy;

  BlockSparsePolicy(const BlockSparseProblem& prob, bool backward) : p(prob), lay(prob.layout) {
    group = p.heads / p.kv_heads;
    tile_heads = lay.heads == 1 || lay.head_group == group ? group : 1;
    units = p.heads / tile_heads;
    const int64_t want = max_of<int64_t>(1, kTargetLanes / tile_heads);
    rows_per_tile = int(min_of<int64_t>(want, lay.q_block));
    tiles_per_block = (lay.q_block + rows_per_tile - 1) / rows_per_tile;
    L = round_up(int(rows_per_tile * tile_heads), W);
    const int D = int(p.head_dim), Dv = int(p.value_dim);
    dp = round_up(D, W);
    dvp = round_up(Dv, W);
    io = attention_tensors(p);

    const ElementMask& m = lay.mask;
    band = m.has_band;
    docs = m.q_doc != nullptr;
    bits = m.bits != nullptr;
    const int64_t lim = p.q_len + p.kv_len + 1;
    band_lo = I(max_of<int64_t>(-lim, min_of<int64_t>(lim, m.band_lo)));
    band_hi = I(max_of<int64_t>(-lim, min_of<int64_t>(lim, m.band_hi)));
    prefix = m.prefix;
    prefix_causal = m.prefix_causal;

    // Read K/V in place when they are T already, rows can be loaded as whole vectors (the
    // backward reads key rows as vectors: dQ = dS K) and copying would not pay; otherwise
    // convert once into head-major rows.
    const bool compute_type =
        sizeof(In) == sizeof(T) && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16;
    const bool in_place = compute_type && (backward || !worth_packing());
    if (in_place && (!backward || D % W == 0)) {
      keys.base = static_cast<const T*>(p.k.data);
      keys.batch_stride = p.k.batch_stride;
      keys.token_stride = p.k.token_stride;
      keys.head_stride = p.k.head_stride;
    } else {
      convert_token_rows<In, T>(p, p.k, D, dp, key_copy, keys);
    }
    if (in_place && Dv % W == 0) {
      values.base = static_cast<const T*>(p.v.data);
      values.batch_stride = p.v.batch_stride;
      values.token_stride = p.v.token_stride;
      values.head_stride = p.v.head_stride;
    } else {
      convert_token_rows<In, T>(p, p.v, Dv, dvp, value_copy, values);
    }
  }

  // Whether copying K/V into head-major rows pays for itself. In the caller's heads-last
  // [B, Tk, H_kv, D] tensors consecutive keys lie H_kv x D elements apart (1 KiB for 4 fp32
  // heads of 64): a 64-key chunk spreads over a quarter of the L1 sets and defeats the
  // hardware prefetchers, and the random 10% pattern's forward measured 15-20% faster on
  // head-major K/V (docs/performance.md). The copy is one pass over K and V, so the forward
  // makes it when the tiles read each kv block at least twice on average. The backward keeps
  // its memory to its dK/dV accumulators and reads K/V in place.
  bool worth_packing() const {
    if (p.k.token_stride == p.head_dim && p.v.token_stride == p.value_dim)
      return false;  // rows are adjacent already (one kv head, or head-major views)
    const int64_t rows = lay.batch * lay.heads * lay.num_q_blocks;
    int64_t listed = 0;
    for (int64_t r = 0; r < rows; ++r) listed += int64_t(lay.partial_count[r]) + lay.full_count[r];
    // Tile visits: each layout row serves B / lay.batch batches and H / lay.heads query heads,
    // tile_heads of them per tile, in tiles_per_block tiles.
    const double reads = double(listed) * double(p.batch / lay.batch) *
                         double(p.heads / lay.heads) / double(tile_heads) * tiles_per_block;
    return reads >= 2.0 * double(p.batch * p.kv_heads * lay.num_kv_blocks);
  }

  const BlockSparseProblem& problem() const { return p; }
  const AttentionTensors& tensors() const { return io; }
  int lanes() const { return L; }

  // Tiles in (batch, head unit, query block, row range) order.
  int64_t tiles_per_unit() const { return int64_t(lay.num_q_blocks) * tiles_per_block; }
  int64_t num_tiles() const { return p.batch * units * tiles_per_unit(); }
  bool tile(int64_t index, Tile* t) const {
    const int64_t per_unit = tiles_per_unit();
    const int64_t bu = index / per_unit, rest = index % per_unit;
    t->b = bu / units;
    t->head = (bu % units) * tile_heads;
    t->hk = t->head / group;
    t->qb = int(rest / tiles_per_block);
    t->first = int(rest % tiles_per_block) * rows_per_tile;
    const int64_t q0 = int64_t(t->qb) * lay.q_block + t->first;
    const int64_t block_end = min_of<int64_t>(int64_t(t->qb + 1) * lay.q_block, p.q_len);
    t->rows = int(min_of<int64_t>(rows_per_tile, block_end - q0));
    return t->rows > 0;
  }
  // Kv blocks the tile's query block visits (its share of the work).
  int64_t tile_blocks(const Tile& t) const {
    const int64_t row = lay.q_row(t.b, t.head, t.qb);
    return int64_t(lay.partial_count[row]) + lay.full_count[row];
  }

  void init_lanes(Lanes& ln) const {
    ln.init(L);
    ln.query.assign(L, 0);
    ln.doc.assign(L, 0);
    ln.row.assign(L, -1);
  }

  void init_chunk(Chunk& ch, bool backward) const {
    ch.init(kChunk, backward);
    ch.key.assign(kChunk, 0);
    ch.key_doc.assign(kChunk, 0);
    ch.word.assign(kChunk, 0);
    ch.bit.assign(kChunk, 0);
    ch.lane_words.assign(size_t(kChunk) * L, 0);
    if (bits && !lay.mask.structured())
      ch.full_keys.allocate(size_t(lay.max_partial) * size_t(lay.kv_block));
    if (bits) {
      ch.any_bits.assign(size_t(lay.mask.words), 0u);
      ch.all_bits.assign(size_t(lay.mask.words), 0u);
    }
  }

  // Lane hg * rows_per_tile + r is query row first + r of head head + hg.
  void setup_lanes(const Tile& t, Lanes& ln) const {
    const int64_t qbase = int64_t(t.qb) * lay.q_block + t.first;
    const int64_t db = lay.mask.doc_batch > 1 ? t.b : 0;
    for (int l = 0; l < L; ++l) {
      ln.head[l] = -1;
      ln.row[l] = -1;
      ln.query[l] = 0;
      ln.doc[l] = 0;
    }
    for (int64_t hg = 0; hg < tile_heads; ++hg)
      for (int r = 0; r < t.rows; ++r) {
        const int l = int(hg * rows_per_tile + r);
        const int64_t q = qbase + r, h = t.head + hg;
        ln.head[l] = int(h);
        ln.row[l] = t.first + r;
        ln.query[l] = I(q);
        if (docs) ln.doc[l] = I(lay.mask.q_doc[db * p.q_len + q]);
        ln.q_off[l] = p.q.offset(t.b, q, h);
        ln.out_off[l] = p.out.offset(t.b, q, h);
        ln.grad_out_off[l] = p.grad_out.offset(t.b, q, h);
        ln.grad_q_off[l] = p.grad_q.offset(t.b, q, h);
        ln.lse_off[l] = (t.b * p.q_len + q) * p.heads + h;
      }
  }

  // Calls fn(chunk) for the tile's partial chunks, then its full chunks.
  //
  // Bitmask blocks are compacted per 32-key word over the tile's rows: a key no row keeps is
  // never visited, and, without a structured rule, a key every row keeps joins the full
  // chunks. So a partial block larger than the mask's real granularity (a 64 x 64 pattern
  // given as 128-blocks) costs what the pattern costs, not what its blocks cost.
  template <class Fn>
  void for_each_chunk(const Tile& t, const Lanes& ln, Chunk& ch, const GradTarget* acc,
                      Fn&& fn) const {
    const int64_t row = lay.q_row(t.b, t.head, t.qb);
    const int64_t db = lay.mask.doc_batch > 1 ? t.b : 0;
    const int32_t* kv_doc = docs ? lay.mask.kv_doc + db * p.kv_len : nullptr;
    const int words = lay.mask.words;
    const bool structured = lay.mask.structured();
    int slots = 0;
    const uint32_t* slot_src = nullptr;  // the bitmask word the newest slot holds
    auto flush = [&] {
      if (ch.n > 0) fn(ch);
      ch.n = 0;
      slots = 0;
      slot_src = nullptr;
    };
    // Row pointers from the (batch, kv head) bases, held in locals: the stores into the chunk's
    // tables would otherwise make the compiler reload every stride per key.
    const T* const key0 = keys.row(t.b, t.hk, 0);
    const T* const value0 = values.row(t.b, t.hk, 0);
    const int64_t key_ld = keys.token_stride, value_ld = values.token_stride;
    auto add_key = [&](int64_t k) {
      if (ch.n == kChunk) flush();
      const int j = ch.n++;
      ch.krow[j] = key0 + k * key_ld;
      ch.vrow[j] = value0 + k * value_ld;
      if (acc) {
        ch.gk[j] = acc->k + k * acc->k_ld;
        ch.gv[j] = acc->v + k * acc->v_ld;
      }
      return j;
    };
    auto add_partial_key = [&](int64_t k) {
      const int j = add_key(k);
      ch.key[j] = I(k);
      if (kv_doc) ch.key_doc[j] = I(kv_doc[k]);
      return j;
    };
    // Column c of bitmask `block`: its word, gathered for every lane once per chunk.
    auto add_bit_key = [&](const uint32_t* block, int64_t k, int c) {
      const int j = add_partial_key(k);
      const uint32_t* src = block + (c >> 5);
      if (src != slot_src) {
        slot_src = src;
        I* lw = ch.lane_words.data() + int64_t(slots++) * L;
        for (int l = 0; l < L; ++l)
          lw[l] = ln.row[l] < 0 ? I(0) : I(src[int64_t(ln.row[l]) * words]);
      }
      ch.word[j] = slots - 1;
      ch.bit[j] = c & 31;
    };
    // The K/V rows of kv block kb, asked for ahead of their chunk: the tile reads each block
    // once, long after the previous tile of the head did, so they come from L3 or memory.
    const int key_lines = int((int64_t(p.head_dim) * int64_t(sizeof(T)) + 63) / 64);
    const int value_lines = int((int64_t(p.value_dim) * int64_t(sizeof(T)) + 63) / 64);
    auto prefetch_block = [&](int64_t kb) {
      if (kb < 0 || kb >= lay.num_kv_blocks) return;
      const int64_t k0 = kb * lay.kv_block, k1 = min_of<int64_t>(k0 + lay.kv_block, p.kv_len);
      for (int64_t k = k0; k < k1; ++k) {
        const char* kr = reinterpret_cast<const char*>(key0 + k * key_ld);
        const char* vr = reinterpret_cast<const char*>(value0 + k * value_ld);
        for (int c = 0; c < key_lines; ++c) __builtin_prefetch(kr + 64 * c, 0, 3);
        for (int c = 0; c < value_lines; ++c) __builtin_prefetch(vr + 64 * c, 0, 3);
      }
    };
    int deferred = 0;  // keys of bitmask blocks that every row keeps (full, without a rule)

    ch.n = 0;
    // Partial blocks. Without an element rule they are kept whole: full chunks.
    ch.full = !lay.mask.any();
    const int np = lay.partial_count[row];
    for (int s = 0; s < np; ++s) {
      const int64_t kb = lay.partial_index[row * lay.max_partial + s];
      if (kb < 0 || kb >= lay.num_kv_blocks) continue;
      const int64_t k0 = kb * lay.kv_block;
      const int64_t k1 = min_of<int64_t>(k0 + lay.kv_block, p.kv_len);
      const uint32_t* block = ch.full || !bits ? nullptr : lay.block_bits(row, s);
      if (block && s + 1 < np) {
        // The next block's rows for this tile: one run of a few KiB the loop below would
        // otherwise wait for line by line (it is read once per call, from memory).
        const char* next =
            reinterpret_cast<const char*>(lay.block_bits(row, s + 1) + int64_t(t.first) * words);
        const int64_t bytes = int64_t(t.rows) * words * int64_t(sizeof(uint32_t));
        for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(next + c, 0, 3);
      }
      if (!block) {
        for (int64_t k = k0; k < k1; ++k) {
          if (ch.full)
            add_key(k);
          else
            add_partial_key(k);
        }
        continue;
      }
      uint32_t* any_w = ch.any_bits.data();
      uint32_t* all_w = ch.all_bits.data();
      fold_rows(block + int64_t(t.first) * words, t.rows, words, any_w, all_w);
      for (int64_t w0 = k0; w0 < k1; w0 += 32) {
        const int c0 = int(w0 - k0), ncol = int(min_of<int64_t>(32, k1 - w0));
        const uint32_t valid = ncol == 32 ? ~0u : (1u << ncol) - 1u;
        const uint32_t any = any_w[c0 >> 5] & valid, all = all_w[c0 >> 5] & valid;
        uint32_t partial = any;
        if (!structured) {
          partial &= ~all;
          for (uint32_t m = all; m; m &= m - 1) ch.full_keys[deferred++] = w0 + __builtin_ctz(m);
        }
        for (uint32_t m = partial; m; m &= m - 1) {
          const int c = c0 + __builtin_ctz(m);
          add_bit_key(block, k0 + c, c);
        }
      }
    }
    flush();

    // Full blocks, after the keys of bitmask blocks that every row keeps.
    ch.full = true;
    for (int i = 0; i < deferred; ++i) add_key(ch.full_keys[i]);
    const int nf = lay.full_count[row];
    if (nf > 0) prefetch_block(lay.full_index[row * lay.max_full]);
    for (int s = 0; s < nf; ++s) {
      const int64_t kb = lay.full_index[row * lay.max_full + s];
      if (s + 1 < nf) prefetch_block(lay.full_index[row * lay.max_full + s + 1]);
      if (kb < 0 || kb >= lay.num_kv_blocks) continue;
      const int64_t k0 = kb * lay.kv_block;
      const int64_t k1 = min_of<int64_t>(k0 + lay.kv_block, p.kv_len);
      for (int64_t k = k0; k < k1; ++k) add_key(k);
    }
    flush();
  }

  // The element rule of column j for lanes [v, v + W) (partial chunks): -1 where kept.
  VI keep(const Chunk& ch, const Lanes& ln, int j, int v) const {
    VI m = vbroadcast<VI>(I(-1));
    if (bits) {
      const VI wv = vload<VI>(ch.lane_words.data() + int64_t(ch.word[j]) * L + v);
      m = VI{} - ((wv >> vbroadcast<VI>(I(ch.bit[j]))) & vbroadcast<VI>(I(1)));
    }
    if (band) {
      const VI d = vbroadcast<VI>(ch.key[j]) - vload<VI>(ln.query.data() + v);
      if (ch.key[j] >= prefix)
        m &= (d >= vbroadcast<VI>(band_lo)) & (d <= vbroadcast<VI>(band_hi));
      else if (prefix_causal)  // a sink: kept up to the band's upper edge
        m &= d <= vbroadcast<VI>(band_hi);
    }
    if (docs) m &= vload<VI>(ln.doc.data() + v) == vbroadcast<VI>(ch.key_doc[j]);
    return m;
  }

  // The same rule for one element.
  bool keeps(const Chunk& ch, const Lanes& ln, int j, int l) const {
    if (bits && !((ch.lane_words[int64_t(ch.word[j]) * L + l] >> ch.bit[j]) & 1)) return false;
    if (band) {
      const I d = ch.key[j] - ln.query[l];
      if (ch.key[j] >= prefix ? d < band_lo || d > band_hi : prefix_causal && d > band_hi)
        return false;
    }
    return !docs || ln.doc[l] == ch.key_doc[j];
  }

  // Block-sparse attention has no bias.
  void add_bias(const Chunk&, const Lanes&, T*) const {}
  void add_bias_grad(const Chunk&, const Lanes&, const T*, const GradTarget&) const {}
};

}  // namespace tokenmix::cpu::TOKENMIX_ISA
