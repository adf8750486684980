// The forward kernel body of the CUDA attention engine: one block per (batch, head, query tile,
// value chunk); S = Q K^T over the key chunks the policy lists (a warp skips the 16-key groups of a
// partial chunk that none of its rows keeps), masking (partial chunks only), online softmax in
// log2 units, O += P V; writes O and the LSE. See attention_engine.h for the
// policy contract. kWgmma: the sm_90a path (warpgroup_gemm.h: the block's four warps multiply as
// one warpgroup, whole chunks, tiles in SwizzledRows); otherwise each warp multiplies its 16 rows
// with mma.sync (or FMAs for fp32) from padded rows.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/online_softmax.h"
#include "tokenmix/cuda/smem_plan.h"
#include "tokenmix/cuda/tile_io.h"
#include "tokenmix/cuda/warpgroup_gemm.h"

namespace tokenmix::cuda {

// kDim: the head dim when D == Dv == kDim (one value chunk), 0 for the general path (any D, Dv
// multiple of 8 up to 256, value columns in chunks of 64: grid.y). KeyOffset: the policy's type
// of key-row offsets (QueryTile's second argument; int32_t where the host has checked they fit).
template <class Policy, class E, int kDim, bool kWgmma = false, class KeyOffset = int64_t>
TM_DEVICE void attention_forward(const typename Policy::Params& p) {
  static_assert(!kWgmma || (E::kTensorCore && kDim > 0), "the wgmma path has fixed head dims");
  using T = typename E::T;
  using Tile = typename Policy::template QueryTile<E, KeyOffset>;
  constexpr int kKeys = E::kKeys, KC = kKeys / 8;
  constexpr int kVChunk = kDim > 0 ? kDim : 64;
  constexpr int NV = kVChunk / 8;
  const int lane = int(lane_id()), warp = int(warp_id());
  const int vc0 = int(block_idx().y) * kVChunk;
  Tile tile;
  if (!tile.init(p)) return;
  const int nrows = tile.nrows;
  const int dp = kDim > 0 ? kDim : p.head_dim_padded;
  const QueryMajorSmem L =
      query_major_smem<E>(dp, kVChunk, false, false, Tile::row_ints(p), Tile::key_ints(p), kWgmma);
  const shared_ptr<unsigned char> smem = plan_base<kWgmma>();
  // Where the tiles' elements lie (tile_offset): SwizzledRows (all tiles have 64 rows), or padded.
  const auto lq = [&] {
    if constexpr (kWgmma)
      return SwizzledRows{kTileRows};
    else
      return L.ldq;
  }();
  const auto lv = [&] {
    if constexpr (kWgmma)
      return SwizzledRows{kKeys};
    else
      return L.ldv;
  }();
  static_assert(!kWgmma || kKeys == kTileRows, "Q and K tiles share SwizzledRows{64}");
  const shared_ptr<T> sq = ptr_cast<T>(smem + L.q), sk = ptr_cast<T>(smem + L.k),
                      sv = ptr_cast<T>(smem + L.v);
  [[maybe_unused]] const WgTiles wg = [&] {
    if constexpr (kWgmma)
      return wg_tiles(sq, sk, sv, kKeys);
    else
      return WgTiles{};
  }();
  const shared_ptr<int> rows = ptr_cast<int>(smem + L.rows), keys = ptr_cast<int>(smem + L.keys);
  const shared_ptr<int> votes = ptr_cast<int>(smem + L.votes);
  const shared_ptr<float> stage = ptr_cast<float>(smem + L.stage) + warp * stage_floats<E>(kKeys);
  const global_ptr<const T> q(static_cast<const T*>(p.q));
  tile.write_rows(p, rows);
  copy_rows<kTileRows>(sq, lq, dp, q, 0, p.head_dim,
                       [&](int r) { return tile.offset(p, r, Operand::kQ); });

  // The normal pass leaves the scale of a main-path chunk to the exponent (mask_scores), which
  // takes a positive finite scale; the exact pass always applies it first.
  const bool fold = p.scale_log2 > 0.0f && p.scale_log2 < kInf;
  float o[NV][4], m[2], l[2];
  bool nan_logit[2];  // pass 1: a kept logit of the row was NaN (for the LSE)
  typename Tile::RowState rs{};

  // Pass 0 multiplies P V with tensor cores (or the staged FMAs). A V row holding an inf or NaN
  // would turn the masked (0) P entries of every row into NaN there (0 * inf), so a block whose O
  // came out non-finite runs pass 1: each V tile is checked and the ones with an inf or NaN take
  // gemm_pn_exact. Finite inputs run pass 1 only when O itself overflows (values within a factor
  // of the keys times 2^8 of the float range's end: the normal pass's P reaches 2^8).
  for (int pass = 0; pass < 2; ++pass) {
    const bool exact = pass == 1;
    typename Tile::ValuesRow v_row{};  // from load_keys of the chunk whose K was copied last
    if (tile.chunks > 0) v_row = tile.load_keys(p, 0, keys, sk, lq, dp);
    cp_async_commit_group();  // (with the Q copy in pass 0)
    zero_acc(o);
    TM_UNROLL
    for (int ri = 0; ri < 2; ++ri) {
      m[ri] = kNegInf;
      l[ri] = 0.0f;
      nan_logit[ri] = false;
    }

    // Two copies in flight per chunk, one shared tile each: V of chunk c lands while S = Q K^T is
    // computed, K of chunk c + 1 while the softmax and P V run.
    for (int c = 0; c < tile.chunks; ++c) {
      cp_async_wait_group<0>();                          // K (and metadata) of chunk c
      if constexpr (kWgmma) fence_proxy_async_shared();  // wgmma reads the copies (and Q)
      sync_threads();  // ... from every thread; every warp is done with V of chunk c - 1
      tile.load_values(p, c, v_row, sv, lv, kVChunk, vc0);
      cp_async_commit_group();
      if (c == 0) rs = tile.read_rows(p, rows, warp * 16 + (lane >> 2));

      const bool full = tile.full(p, c);
      const ChunkMask cm = chunk_mask<KC>(
          rs.valid, full, [&](int ri, int j) { return tile.keep(p, rs, ri, keys, c, j); });
      float s[KC][4];
      zero_acc(s);
      if constexpr (kWgmma)
        wg_scores<E, kDim>(s, wg);  // whole chunks: the warpgroup has every group
      else
        gemm_nt<E>(s, sq + warp * 16 * L.ldq, L.ldq, sk, L.ldq, dp, cm.groups);
      const MaskedScores ms = mask_scores(
          s, rs.valid, p.scale_log2, full, tile.biased(p, c), cm.kept,
          [&](int ri, int j) { return tile.bias(p, rs, ri, keys, j); }, fold && !exact);
      cp_async_wait_group<0>();  // V of chunk c
      if constexpr (kWgmma) fence_proxy_async_shared();
      if (exact) block_any_vote(votes, copied_nonfinite<kKeys, E>(sv, lv, kVChunk, 0, kVChunk));
      sync_threads();  // every warp is done with K and the metadata of chunk c
      const bool v_bad = exact && block_any_result(votes);
      if (c + 1 < tile.chunks) v_row = tile.load_keys(p, c + 1, keys, sk, lq, dp);
      cp_async_commit_group();

      online_softmax_step(s, o, m, l, nan_logit, exact, ms.scale);
      if (v_bad)
        gemm_pn_exact<E>(o, s, ms.kept, sv, lv);
      else if constexpr (kWgmma)
        wg_values<E>(o, s, wg);
      else
        gemm_pn<E>(o, s, sv, L.ldv, stage, cm.groups);
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
    const int64_t row = tile.offset(p, r, Operand::kOut);
    TM_UNROLL
    for (int n = 0; n < NV; ++n) {
      TM_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int col = vc0 + n * 8 + 2 * (lane & 3) + e;
        if (col < p.value_dim) out[row + col] = E::from_float(o[n][2 * ri + e] * inv);
      }
    }
    // Either non-finite case makes O non-finite, so pass 1 ran and recorded the NaN logits.
    if (vc0 == 0 && (lane & 3) == 0) lse[tile.row(p, r)] = row_lse(m[ri], total, nan_row);
  }
}

}  // namespace tokenmix::cuda
