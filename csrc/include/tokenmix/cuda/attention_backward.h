// The backward kernel bodies of the CUDA attention engine (see attention_engine.h for the policy
// contract), recomputed from the forward's LSE:
//   attention_delta  delta = rowsum(dO * O) - grad_lse, one warp per query row.
//   attention_dq     query-major like the forward: P from the LSE, dS = P (dP - delta),
//                    dQ += dS K over the chunks the policy lists; the policy's bias gradient.
//   attention_dkdv   key-major: keys as rows, the policy's steps (query head, query chunk) that see
//                    the key tile; dV += P^T dO, dK += dS^T Q. GQA heads are summed in the block.
//                    One warp per 16 keys and at most 64 columns per block (grid.y), or at D=128
//                    two warps per 16 keys for the whole head (attention_dkdv_pairs.h).
// dQ, dK and dV are each written by exactly one block, so they need no atomics.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/attention_dkdv_pairs.h"
#include "tokenmix/cuda/online_softmax.h"
#include "tokenmix/cuda/smem_plan.h"
#include "tokenmix/cuda/tile_io.h"

namespace tokenmix::cuda {

// delta[row] = sum_c dO * O - grad_lse for the rows of [B, Tq, H]: one warp per row.
template <class Policy, class E>
TM_DEVICE void attention_delta(const typename Policy::Params& p) {
  using T = typename E::T;
  const int lane = int(lane_id());
  const int64_t row = int64_t(block_idx().x) * kWarps + warp_id();
  if (row >= Policy::query_rows(p)) return;
  const global_ptr<const T> go(static_cast<const T*>(p.grad_out)),
      o(static_cast<const T*>(p.out_in));
  const int64_t go_off = Policy::row_offset(p, row, Operand::kGradOut);
  const int64_t o_off = Policy::row_offset(p, row, Operand::kOut);
  float acc = 0.0f;
  for (int c = lane; c < p.value_dim; c += 32)
    acc += E::to_float(go[go_off + c]) * E::to_float(o[o_off + c]);
  for (int off = 16; off > 0; off >>= 1) acc += shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    float d = acc;
    if (p.grad_lse) d -= global_ptr<const float>(p.grad_lse)[row];
    global_ptr<float>(p.delta)[row] = d;
  }
}

// Whether the dQ kernel's 128-column accumulators leave room for a whole 16 x 64 dP: measured
// with ptxas -v (0 spills on sm_90; 8-byte spills on sm_80 even in two parts; the emulator takes
// the parts). Device code only: the host compile sees false.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kDqWholeDp = true;
#else
constexpr bool kDqWholeDp = false;
#endif

template <class Policy, class E, int kDim>
TM_DEVICE void attention_dq(const typename Policy::Params& p) {
  using T = typename E::T;
  using Tile = typename Policy::template QueryTile<E>;
  constexpr int kKeys = E::kKeys, KC = kKeys / 8;
  constexpr int kChunk = dq_chunk<kDim>;
  constexpr int NQ = kChunk / 8;
  // Beside a 128-column dQ, dP is computed in kDPParts key parts: whole on sm_90, where ptxas
  // fits it in 255 registers without spills, else 16 keys at a time (+24 ldmatrix per chunk).
  constexpr int kDPParts = kChunk > 64 && !kDqWholeDp ? 4 : 1;
  const int lane = int(lane_id()), warp = int(warp_id()), tid = int(linear_thread_idx());
  const int col0 = int(block_idx().y) * kChunk;
  Tile tile;
  if (!tile.init(p)) return;
  const int nrows = tile.nrows;
  const bool bias_grad = tile.bias_grad_enabled(p);
  const int dp = grad_tile_width<kDim>(p), dvp = dp;
  // k extents of S = Q K^T and dP = dO V^T (the tiles are zero past D and Dv)
  const int kq = kDim > 0 ? kDim : p.head_dim_padded;
  const int kv = kDim > 0 ? kDim : p.value_dim_padded;
  const QueryMajorSmem L =
      query_major_smem<E>(dp, dvp, true, Tile::bias_stage(p), Tile::row_ints(p), Tile::key_ints(p));
  const shared_ptr<unsigned char> smem = dynamic_shared<unsigned char>();
  const shared_ptr<T> sq = ptr_cast<T>(smem + L.q), sgo = ptr_cast<T>(smem + L.go),
                      sk = ptr_cast<T>(smem + L.k), sv = ptr_cast<T>(smem + L.v);
  const shared_ptr<int> rows = ptr_cast<int>(smem + L.rows), keys = ptr_cast<int>(smem + L.keys);
  const shared_ptr<float> rowf = ptr_cast<float>(smem + L.rowf);  // lse2, delta
  const shared_ptr<int> votes = ptr_cast<int>(smem + L.votes);
  const shared_ptr<float> stage = ptr_cast<float>(smem + L.stage) + warp * stage_floats<E>(kKeys);
  const shared_ptr<float> sds = ptr_cast<float>(smem + L.ds);
  const global_ptr<const T> q(static_cast<const T*>(p.q)), go(static_cast<const T*>(p.grad_out));

  tile.write_rows(p, rows);
  if (tid < kTileRows) {
    float lse2 = 0.0f, delta = 0.0f;
    if (tid < nrows) {
      const int64_t row = tile.row(p, tid);
      lse2 = global_ptr<const float>(p.lse_in)[row] * kLog2e;
      delta = global_ptr<const float>(p.delta)[row];
    }
    rowf[tid] = lse2;
    rowf[kTileRows + tid] = delta;
  }
  copy_rows<kTileRows>(sq, L.ldq, dp, q, 0, p.head_dim,
                       [&](int r) { return tile.offset(p, r, Operand::kQ); });
  copy_rows<kTileRows>(sgo, L.ldv, dvp, go, 0, p.value_dim,
                       [&](int r) { return tile.offset(p, r, Operand::kGradOut); });

  float dq[NQ][4];
  // The policy's row state (18 words for a neighborhood row) is held across the chunk loop, or
  // read again at each chunk beside a 128-column dQ, whose registers it would take.
  constexpr bool kRereadRows = kChunk > 64;
  typename Tile::RowState rs{};
  float lse2[2] = {0.0f, 0.0f}, delta[2] = {0.0f, 0.0f};
  bool alive[2] = {true, true};  // the row has a key left (LSE > -inf)
  bool fold = true;              // every row of the warp has an LSE below kFoldLimit (or none)

  // Pass 0 as the forward's: a block whose dQ came out non-finite computes it again in pass 1,
  // where K tiles with an inf or NaN take gemm_pn_exact (and the bias gradient, done, is skipped).
  for (int pass = 0; pass < 2; ++pass) {
    const bool exact = pass == 1;
    typename Tile::ValuesRow v_row{};  // from load_keys of the chunk whose K was copied last
    if (tile.chunks > 0) v_row = tile.load_keys(p, 0, keys, sk, L.ldq, dp);
    cp_async_commit_group();  // (with the Q and dO copies in pass 0)
    zero_acc(dq);

    // V of chunk c lands while S = Q K^T is computed (K is needed again for dQ += dS K).
    for (int c = 0; c < tile.chunks; ++c) {
      cp_async_wait_group<0>();  // K (and metadata) of chunk c
      if (exact)
        block_any_vote(votes, copied_nonfinite<kKeys, E>(sk, L.ldq, dp, col0, col0 + kChunk));
      sync_threads();
      const bool k_bad = exact && block_any_result(votes);
      tile.load_values(p, c, v_row, sv, L.ldv, dvp, 0);
      cp_async_commit_group();
      if (c == 0) {
        const int r0 = warp * 16 + (lane >> 2);
        TM_UNROLL
        for (int ri = 0; ri < 2; ++ri) {
          lse2[ri] = rowf[r0 + 8 * ri];
          delta[ri] = rowf[kTileRows + r0 + 8 * ri];
          alive[ri] = lse2[ri] != kNegInf;
        }
        fold = !any_sync(0xffffffffu, !(foldable(lse2[0]) && foldable(lse2[1])));
      }

      if (kRereadRows || c == 0) rs = tile.read_rows(p, rows, warp * 16 + (lane >> 2));
      const bool full = tile.full(p, c);
      const ChunkMask cm = chunk_mask<KC>(
          rs.valid, full, [&](int ri, int j) { return tile.keep(p, rs, ri, keys, c, j); });
      float s[KC][4];  // S, then dS
      zero_acc(s);
      gemm_nt<E>(s, sq + warp * 16 * L.ldq, L.ldq, sk, L.ldq, kq, cm.groups);
      // (P = exp2(s * scale - LSE) takes no max: any scale may be left to the exponent)
      const auto [kept, scale] = mask_scores(
          s, rs.valid, p.scale_log2, full, tile.biased(p, c), cm.kept,
          [&](int ri, int j) { return tile.bias(p, rs, ri, keys, j); }, fold);
      cp_async_wait_group<0>();  // V of chunk c
      sync_threads();
      // dS = P (dP - delta) in place of S, with dP = dO V^T computed in kDPParts key parts.
      TM_UNROLL
      for (int h = 0; h < kDPParts; ++h) {
        constexpr int N = KC / kDPParts;
        float dp_[N][4];
        gemm_nt_part<E, KC, kDPParts>(dp_, h, sgo + warp * 16 * L.ldv, L.ldv, sv, L.ldv, kv,
                                      cm.groups);
        TM_UNROLL
        for (int n = 0; n < N; ++n) {
          TM_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int ri = i >> 1, t = h * N + n;
            // dS (natural-log logits) by selection: exactly 0 where the mask drops the element
            // and on rows without keys (whose LSE is -inf), whatever dP, delta or the LSE hold
            // there.
            const bool live = ((kept >> (4 * t + i)) & 1u) != 0 && alive[ri];
            s[t][i] = live ? exp2f_ftz(fma_rn(s[t][i], scale, -lse2[ri])) * (dp_[n][i] - delta[ri])
                           : 0.0f;
          }
        }
      }
      if constexpr (Tile::kBiasGrad) {
        if (bias_grad && !exact) tile.bias_grad(p, s, rs, keys, c, sds);
      }
      sync_warp();  // reconverge after per-lane policy code: mma.sync needs all 32 lanes
      if (k_bad)
        gemm_pn_exact<E>(dq, s, kept, sk + col0, L.ldq);
      else
        gemm_pn<E>(dq, s, sk + col0, L.ldq, stage, cm.groups);
      sync_threads();  // every warp is done with K, V and the metadata of chunk c
      if (c + 1 < tile.chunks) v_row = tile.load_keys(p, c + 1, keys, sk, L.ldq, dp);
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
    const int64_t row = tile.row(p, r);
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

// Keys as rows, one warp per 16 keys: one block per (batch, kv head, key tile, column chunk);
// chunk c covers dK columns [64c, 64c + 64) and dV columns [64c, 64c + 64).
template <class Policy, class E, int kDim>
TM_DEVICE void attention_dkdv_column_chunks(const typename Policy::Params& p) {
  using T = typename E::T;
  using Tile = typename Policy::template KeyTile<E>;
  using Step = typename Tile::Step;
  constexpr int kCols = E::kKeys, KC = kCols / 8;
  constexpr int kChunk = dkdv_chunk<kDim>;
  constexpr int NC = kChunk / 8;
  const int lane = int(lane_id()), warp = int(warp_id()), tid = int(linear_thread_idx());
  const int col0 = int(block_idx().y) * kChunk;
  Tile tile;
  if (!tile.init(p)) return;
  const int nkeys = tile.nkeys;
  const int dp = grad_tile_width<kDim>(p), dvp = dp;
  const int kq = kDim > 0 ? kDim : p.head_dim_padded;
  const int kv = kDim > 0 ? kDim : p.value_dim_padded;
  const KeyMajorSmem L = key_major_smem<E>(dp, dvp, Tile::row_ints(p), Tile::col_ints(p));
  const shared_ptr<unsigned char> smem = dynamic_shared<unsigned char>();
  const shared_ptr<T> sk = ptr_cast<T>(smem + L.k), sv = ptr_cast<T>(smem + L.v),
                      sq = ptr_cast<T>(smem + L.q), sgo = ptr_cast<T>(smem + L.go);
  const shared_ptr<int> rows = ptr_cast<int>(smem + L.rows), cols = ptr_cast<int>(smem + L.cols);
  const shared_ptr<float> colf = ptr_cast<float>(smem + L.colf);  // lse2, delta
  const shared_ptr<int> colvalid = ptr_cast<int>(smem + L.colf) + 2 * kCols;
  const shared_ptr<int> votes = ptr_cast<int>(smem + L.votes);  // Q, dO, end (kWarps words each)
  const shared_ptr<float> stage = ptr_cast<float>(smem + L.stage) + warp * stage_floats<E>(kCols);
  const global_ptr<const T> q(static_cast<const T*>(p.q)), go(static_cast<const T*>(p.grad_out));

  tile.write_keys(p, rows);
  sync_threads();  // the key metadata may describe the steps (load_queries reads it)
  copy_rows<kTileRows>(sk, L.ldq, dp, tile.source(p, Operand::kK), 0, p.head_dim,
                       [&](int r) { return tile.key_offset(p, r, Operand::kK); });
  copy_rows<kTileRows>(sv, L.ldv, dvp, tile.source(p, Operand::kV), 0, p.value_dim,
                       [&](int r) { return tile.key_offset(p, r, Operand::kV); });
  cp_async_commit_group();

  // Step st's column metadata (the policy's, then validity, LSE and delta) and Q rows; its dO rows
  // are a separate copy. Each lane finds its copy column (warp_row) once, for all of them; the
  // first kCols / kWarps lanes of each warp write its metadata.
  int64_t go_offset = -1;  // the dO row of this lane's column, for load_grads
  auto load_queries = [&](const Step& st) {
    tile.write_cols(p, st, cols);
    const int j = warp_row<kCols>();
    const bool owner = lane < kCols / kWarps;
    const typename Tile::QueryCol qc = tile.query_col(p, st, j, cols, owner);
    float lse2 = 0.0f, delta = 0.0f;
    if (qc.row >= 0) {
      lse2 = global_ptr<const float>(p.lse_in)[qc.row] * kLog2e;
      delta = global_ptr<const float>(p.delta)[qc.row];
    }
    if (owner) {
      colvalid[j] = qc.row >= 0 ? 1 : 0;
      colf[j] = lse2;
      colf[kCols + j] = delta;
    }
    go_offset = qc.go;
    copy_rows_at<kCols>(sq, L.ldq, dp, q, 0, p.head_dim, qc.q);
  };
  auto load_grads = [&](const Step&) {  // after load_queries of the same step
    copy_rows_at<kCols>(sgo, L.ldv, dvp, go, 0, p.value_dim, go_offset);
  };

  float dk[NC][4], dv[NC][4];
  typename Tile::KeyState ks{};
  bool first_step = true;

  // Pass 0 as the forward's: a block whose dK or dV came out non-finite computes them again in
  // pass 1, where Q and dO tiles with an inf or NaN take gemm_pn_exact.
  for (int pass = 0; pass < 2; ++pass) {
    const bool exact = pass == 1;
    Step st = tile.first(p);
    if (st.valid) load_queries(st);
    cp_async_commit_group();  // (with K and V of the tile in pass 0)
    zero_acc(dk);
    zero_acc(dv);

    // dO of step st lands while S^T = K Q^T is computed (Q is needed again for dK += dS^T Q).
    while (st.valid) {
      cp_async_wait_group<0>();  // Q and metadata of step st (and K, V at the first step)
      if (exact)
        block_any_vote(votes, copied_nonfinite<kCols, E>(sq, L.ldq, dp, col0, col0 + kChunk));
      sync_threads();
      const bool q_bad = exact && block_any_result(votes);
      load_grads(st);
      cp_async_commit_group();
      if (first_step) {
        ks = tile.read_keys(p, rows, warp * 16 + (lane >> 2));
        first_step = false;
      }

      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x kCols queries.
      // kept: the policy's mask (columns without a query are dropped; a full step has none);
      // live: kept, and the query has a key left (its LSE, the logit's reference, is > -inf: a
      // row whose logits are all -inf gets P = 0 rather than exp2(-inf - -inf) = NaN). The warp
      // skips the 16-query groups that none of its keys is kept by.
      const ChunkMask cm = chunk_mask<KC>(ks.valid, st.full, [&](int ri, int j) {
        return colvalid[j] != 0 && tile.keep(p, ks, ri, cols, st, j);
      });
      float s[KC][4], dpt[KC][4];
      zero_acc(s);
      zero_acc(dpt);
      gemm_nt<E>(s, sk + warp * 16 * L.ldq, L.ldq, sq, L.ldq, kq, cm.groups);
      ColumnFloats<kCols> col_lse2;
      col_lse2.load(colf);
      bool fold = true;  // every column of the step has an LSE below kFoldLimit (or none)
      TM_UNROLL
      for (int r = 0; r < kCols / 32; ++r) fold = fold && foldable(col_lse2.v[r]);
      const auto [kept, scale] = mask_scores(
          s, ks.valid, p.scale_log2, st.full, tile.biased(p, st), cm.kept,
          [&](int ri, int j) { return tile.bias(p, ks, ri, cols, st, j); },
          !any_sync(0xffffffffu, !fold));
      uint32_t live = 0;
      TM_UNROLL
      for (int n = 0; n < KC; ++n) {
        const float lse2[2] = {col_lse2.at(n, 0), col_lse2.at(n, 1)};
        TM_UNROLL
        for (int i = 0; i < 4; ++i) {
          const bool alive = ((kept >> (4 * n + i)) & 1u) != 0 && lse2[i & 1] != kNegInf;
          live |= alive ? 1u << (4 * n + i) : 0u;
          s[n][i] = alive ? exp2f_ftz(fma_rn(s[n][i], scale, -lse2[i & 1])) : 0.0f;  // P^T
        }
      }
      cp_async_wait_group<0>();  // dO of step st
      if (exact)
        block_any_vote(votes + kWarps,
                       copied_nonfinite<kCols, E>(sgo, L.ldv, dvp, col0, col0 + kChunk));
      sync_threads();
      const bool g_bad = exact && block_any_result(votes + kWarps);
      gemm_nt<E>(dpt, sv + warp * 16 * L.ldv, L.ldv, sgo, L.ldv, kv, cm.groups);
      float ds[KC][4];
      ColumnFloats<kCols> col_delta;
      col_delta.load(colf + kCols);
      TM_UNROLL
      for (int n = 0; n < KC; ++n) {
        const float delta[2] = {col_delta.at(n, 0), col_delta.at(n, 1)};
        TM_UNROLL
        for (int i = 0; i < 4; ++i)
          ds[n][i] = ((live >> (4 * n + i)) & 1u) != 0  // else exactly 0 (see attention_dq)
                         ? s[n][i] * (dpt[n][i] - delta[i & 1])
                         : 0.0f;
      }
      if (g_bad)
        gemm_pn_exact<E>(dv, s, kept, sgo + col0, L.ldv);
      else
        gemm_pn<E>(dv, s, sgo + col0, L.ldv, stage, cm.groups);
      if (q_bad)
        gemm_pn_exact<E>(dk, ds, kept, sq + col0, L.ldq);
      else
        gemm_pn<E>(dk, ds, sq + col0, L.ldq, stage, cm.groups);
      sync_threads();  // every warp is done with Q, dO and the metadata of step st
      st = tile.next(p, st);
      if (st.valid) load_queries(st);
      cp_async_commit_group();
    }
    cp_async_wait_group<0>();
    if (exact) break;
    block_any_vote(votes + 2 * kWarps, any_nonfinite_acc(dk) || any_nonfinite_acc(dv));
    sync_threads();  // every warp is done with the last step (pass 1 reloads Q and dO)
    if (!block_any_result(votes + 2 * kWarps)) break;
  }
  // Gradient rows are contiguous.
  global_ptr<T> gk(static_cast<T*>(tile.grad(p, Operand::kK))),
      gv(static_cast<T*>(tile.grad(p, Operand::kV)));
  TM_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    const int r = warp * 16 + (lane >> 2) + 8 * ri;
    if (r >= nkeys) continue;
    const int64_t row = tile.grad_row(p, r);
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

// The key-major pass as the launchers size it (dkdv_warps, dkdv_chunk).
template <class Policy, class E, int kDim>
TM_DEVICE void attention_dkdv(const typename Policy::Params& p) {
  if constexpr (dkdv_warps<kDim> > kWarps)
    attention_dkdv_pairs<Policy, E, kDim>(p);
  else
    attention_dkdv_column_chunks<Policy, E, kDim>(p);
}

}  // namespace tokenmix::cuda
