// The D=128 fp16/bf16 dK/dV kernel body: the key-major pass of attention_backward.h with two warps
// per 16 keys (8 warps, one block per key tile for all 128 columns), so that S^T and dP^T are
// computed once per step where two 64-column blocks each computed them whole.
//
// Warp w holds keys 16(w % 4).. and half h = w / 4 of the work:
//   S^T = K Q^T and dP^T = V dO^T for query columns [32h, 32h + 32) of the step, over all 128
//   head columns (K and V rows held in registers as A fragments for the whole tile);
//   P^T and dS^T of those columns, packed to 16 bits as A fragments, go through shared memory to
//   the partner warp w ^ 4, which sends its own half back;
//   dV += P^T dO and dK += dS^T Q for output columns [64h, 64h + 64), over all 64 queries.
// Each warp issues 128 HMMA per step (256 per 16 keys, where two blocks issued 384), and every
// product keeps the order of accumulation of attention_dkdv_column_chunks (attention_backward.h),
// so finite results are the same.
// The first four warps run the policy's metadata and copy K and Q; the others copy V and dO.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/online_softmax.h"
#include "tokenmix/cuda/smem_plan.h"
#include "tokenmix/cuda/tile_io.h"

namespace tokenmix::cuda {

// The 16-bit A fragments of one warp's half of a step (2 k-steps of 16 queries), as
// kPairExchangeBytes lays them out: P^T at [kk][lane], dS^T after it, then the mask words.
struct PairExchange {
  shared_ptr<unsigned char> base;
  static constexpr int kSteps = 2;
  TM_DEVICE shared_ptr<uint32_t> fragments(int warp, int product, int kk) const {
    return ptr_cast<uint32_t>(base + warp * kPairExchangeBytes<F16> +
                              ((product * kSteps + kk) * 32 + int(lane_id())) * 16);
  }
  TM_DEVICE shared_ptr<uint32_t> mask_word(int warp) const {
    return ptr_cast<uint32_t>(base + warp * kPairExchangeBytes<F16> + 2 * kSteps * 32 * 16) +
           int(lane_id());
  }
};

// pack_a_fragment's inverse: the 16-bit values of k-step kk's A fragment as P's floats (the
// exact pass takes P^T and dS^T as the tensor cores see them).
template <class E, int KC>
TM_DEVICE void unpack_a_fragment(float (&p)[KC][4], const uint32_t (&af)[4], int kk) {
  TM_UNROLL
  for (int i = 0; i < 4; ++i) {
    p[2 * kk + i / 2][2 * (i % 2)] = E::to_float(uint16_t(af[i] & 0xffffu));
    p[2 * kk + i / 2][2 * (i % 2) + 1] = E::to_float(uint16_t(af[i] >> 16));
  }
}

template <class Policy, class E, int kDim>
TM_DEVICE void attention_dkdv_pairs(const typename Policy::Params& p) {
  using T = typename E::T;
  using Tile = typename Policy::template KeyTile<E>;
  using Step = typename Tile::Step;
  static_assert(E::kTensorCore && dkdv_warps<kDim> == 2 * kWarps, "the D=128 tensor-core kernel");
  constexpr int kBlockWarps = 2 * kWarps;
  constexpr int kCols = E::kKeys, KC = kCols / 8;   // the step's 64 queries
  constexpr int kHalf = kCols / 2, HC = kHalf / 8;  // a warp's 32 query columns of S^T / dP^T
  constexpr int KS = kDim / 16;                     // k-steps of K and V over the head
  constexpr int NC = kDim / 2 / 8;                  // a warp's 64 output columns
  static_assert(kHalf == 32 && kHalf / 16 == PairExchange::kSteps &&
                    kPairExchangeBytes<E> == kPairExchangeBytes<F16>,
                "the exchange holds two 16-query k-steps");
  const int lane = int(lane_id()), warp = int(warp_id());
  const int kw = warp % kWarps, half = warp / kWarps, partner = warp ^ kWarps;
  const bool lead = half == 0;
  const int c0 = half * kHalf, col0 = half * (kDim / 2);
  Tile tile;
  if (!tile.init(p)) return;
  const int nkeys = tile.nkeys;
  const KeyMajorSmem L =
      key_major_smem<E>(kDim, kDim, Tile::row_ints(p), Tile::col_ints(p), kBlockWarps);
  const shared_ptr<unsigned char> smem = dynamic_shared<unsigned char>();
  const shared_ptr<T> sk = ptr_cast<T>(smem + L.k), sv = ptr_cast<T>(smem + L.v),
                      sq = ptr_cast<T>(smem + L.q), sgo = ptr_cast<T>(smem + L.go);
  const shared_ptr<int> rows = ptr_cast<int>(smem + L.rows), cols = ptr_cast<int>(smem + L.cols);
  const shared_ptr<float> colf = ptr_cast<float>(smem + L.colf);  // lse2, delta
  const shared_ptr<int> colvalid = ptr_cast<int>(smem + L.colf) + 2 * kCols;
  const shared_ptr<int> votes = ptr_cast<int>(smem + L.votes);  // tiles, end (kBlockWarps each)
  const PairExchange xchg{smem + L.exchange};
  const global_ptr<const T> q(static_cast<const T*>(p.q)), go(static_cast<const T*>(p.grad_out));

  tile.write_keys(p, rows);
  sync_threads();  // the key metadata may describe the steps (query_col reads it)
  if (lead)
    copy_rows<kTileRows>(
        sk, L.ldq, kDim, tile.source(p, Operand::kK), 0, p.head_dim,
        [&](int r) { return tile.key_offset(p, r, Operand::kK); }, kw);
  else
    copy_rows<kTileRows>(
        sv, L.ldv, kDim, tile.source(p, Operand::kV), 0, p.value_dim,
        [&](int r) { return tile.key_offset(p, r, Operand::kV); }, kw);
  cp_async_commit_group();

  // Step st's column metadata (the policy's, then validity, LSE and delta; the leading warps),
  // and its Q rows (leading warps) or dO rows (the others): warp w copies rows 16(w % 4)...
  auto load_step = [&](const Step& st) {
    if (lead) tile.write_cols(p, st, cols);
    const int j = warp_row<kCols>(kw);
    const bool owner = lead && lane < kCols / kWarps;
    const typename Tile::QueryCol qc = tile.query_col(p, st, j, cols, owner);
    if (owner) {
      const bool in = qc.row >= 0;
      colvalid[j] = in ? 1 : 0;
      colf[j] = in ? global_ptr<const float>(p.lse_in)[qc.row] * kLog2e : 0.0f;
      colf[kCols + j] = in ? global_ptr<const float>(p.delta)[qc.row] : 0.0f;
    }
    if (lead)
      copy_rows_at<kCols>(sq, L.ldq, kDim, q, 0, p.head_dim, qc.q, kw);
    else
      copy_rows_at<kCols>(sgo, L.ldv, kDim, go, 0, p.value_dim, qc.go, kw);
  };

  uint32_t kf[KS][4], vf[KS][4];  // the warp's 16 K and V rows, whole head (A fragments)
  float dk[NC][4], dv[NC][4];
  typename Tile::KeyState ks{};
  bool first_step = true;

  // Pass 0 as attention_dkdv_column_chunks': a block whose dK or dV came out non-finite computes
  // them again in pass 1, where Q and dO tiles with an inf or NaN take gemm_pn_exact.
  for (int pass = 0; pass < 2; ++pass) {
    const bool exact = pass == 1;
    Step st = tile.first(p);
    if (st.valid) load_step(st);
    cp_async_commit_group();  // (with K and V of the tile in pass 0)
    zero_acc(dk);
    zero_acc(dv);

    while (st.valid) {
      cp_async_wait_group<0>();  // Q, dO and metadata of step st (and K, V at the first step)
      if (exact)                 // the leading warps vote on Q, the others on dO
        block_any_vote(votes, lead ? copied_nonfinite<kCols, E>(sq, L.ldq, kDim, 0, kDim, kw)
                                   : copied_nonfinite<kCols, E>(sgo, L.ldv, kDim, 0, kDim, kw));
      sync_threads();
      const bool q_bad = exact && block_any_result(votes);
      const bool g_bad = exact && block_any_result(votes + kWarps);
      if (first_step) {
        ks = tile.read_keys(p, rows, kw * 16 + (lane >> 2));
        load_a_fragments<E>(kf, sk + kw * 16 * L.ldq, L.ldq);
        load_a_fragments<E>(vf, sv + kw * 16 * L.ldv, L.ldv);
        first_step = false;
      }

      // The warp's half: S^T, P^T, dP^T and dS^T of query columns c0.. (kept, live and the
      // skipped 16-query groups as in attention_dkdv_column_chunks, over these columns).
      const ChunkMask cm = chunk_mask<HC>(ks.valid, st.full, [&](int ri, int j) {
        return colvalid[c0 + j] != 0 && tile.keep(p, ks, ri, cols, st, c0 + j);
      });
      float s[HC][4], dpt[HC][4];
      zero_acc(s);
      zero_acc(dpt);
      gemm_nt_held<E>(s, kf, sq + c0 * L.ldq, L.ldq, cm.groups);
      ColumnFloats<kCols> lse_both;  // both halves' LSEs: the pair takes the same fold choice
      lse_both.load(colf);
      bool fold = true;  // every column of the step has an LSE below kFoldLimit (or none)
      TM_UNROLL
      for (int r = 0; r < kCols / 32; ++r) fold = fold && foldable(lse_both.v[r]);
      ColumnFloats<kHalf> col_lse2;
      col_lse2.v[0] = lead ? lse_both.v[0] : lse_both.v[1];
      const auto [kept, scale] = mask_scores(
          s, ks.valid, p.scale_log2, st.full, tile.biased(p, st), cm.kept,
          [&](int ri, int j) { return tile.bias(p, ks, ri, cols, st, c0 + j); },
          !any_sync(0xffffffffu, !fold));
      uint32_t live = 0;
      TM_UNROLL
      for (int n = 0; n < HC; ++n) {
        const float lse2[2] = {col_lse2.at(n, 0), col_lse2.at(n, 1)};
        TM_UNROLL
        for (int i = 0; i < 4; ++i) {
          const bool alive = ((kept >> (4 * n + i)) & 1u) != 0 && lse2[i & 1] != kNegInf;
          live |= alive ? 1u << (4 * n + i) : 0u;
          s[n][i] = alive ? exp2f_ftz(fma_rn(s[n][i], scale, -lse2[i & 1])) : 0.0f;  // P^T
        }
      }
      gemm_nt_held<E>(dpt, vf, sgo + c0 * L.ldv, L.ldv, cm.groups);
      ColumnFloats<kHalf> col_delta;
      col_delta.load(colf + kCols + c0);
      TM_UNROLL
      for (int n = 0; n < HC; ++n) {
        const float delta[2] = {col_delta.at(n, 0), col_delta.at(n, 1)};
        TM_UNROLL
        for (int i = 0; i < 4; ++i)
          dpt[n][i] = ((live >> (4 * n + i)) & 1u) != 0  // dS^T (else exactly 0, see attention_dq)
                          ? s[n][i] * (dpt[n][i] - delta[i & 1])
                          : 0.0f;
      }

      // Both halves of P^T and dS^T as the A fragments of the step's four k-steps: the warp's
      // own from registers, the partner's through shared memory.
      uint32_t pa[KC / 2][4], dsa[KC / 2][4];
      TM_UNROLL
      for (int kk = 0; kk < PairExchange::kSteps; ++kk) {
        uint32_t own_p[4], own_ds[4];
        pack_a_fragment<E>(own_p, s, kk);
        pack_a_fragment<E>(own_ds, dpt, kk);
        store128(xchg.fragments(warp, 0, kk), u32x4{own_p[0], own_p[1], own_p[2], own_p[3]});
        store128(xchg.fragments(warp, 1, kk), u32x4{own_ds[0], own_ds[1], own_ds[2], own_ds[3]});
        TM_UNROLL
        for (int i = 0; i < 4; ++i) {  // (constant indices; the partner's are filled below)
          pa[kk][i] = pa[kk + 2][i] = own_p[i];
          dsa[kk][i] = dsa[kk + 2][i] = own_ds[i];
        }
      }
      *xchg.mask_word(warp) = kept;
      sync_threads();  // both halves published
      TM_UNROLL
      for (int kk = 0; kk < PairExchange::kSteps; ++kk) {
        const u32x4 vp = load128(xchg.fragments(partner, 0, kk));
        const u32x4 vd = load128(xchg.fragments(partner, 1, kk));
        const uint32_t other_p[4] = {vp.x, vp.y, vp.z, vp.w},
                       other_ds[4] = {vd.x, vd.y, vd.z, vd.w};
        TM_UNROLL
        for (int i = 0; i < 4; ++i) {  // the partner's k-steps are 2(1 - half) + kk
          pa[kk][i] = lead ? pa[kk][i] : other_p[i];
          pa[kk + 2][i] = lead ? other_p[i] : pa[kk + 2][i];
          dsa[kk][i] = lead ? dsa[kk][i] : other_ds[i];
          dsa[kk + 2][i] = lead ? other_ds[i] : dsa[kk + 2][i];
        }
      }
      const uint32_t other_kept = *xchg.mask_word(partner);
      const uint32_t kept_all = lead ? kept | other_kept << 16 : other_kept | kept << 16;
      const uint32_t groups = st.full ? kAllGroups : kept_groups<KC>(kept_all);

      // The exact pass's B tiles with an inf or NaN: P^T and dS^T as floats, one at a time.
      if (g_bad) {
        float pf[KC][4];
        TM_UNROLL
        for (int kk = 0; kk < KC / 2; ++kk) unpack_a_fragment<E>(pf, pa[kk], kk);
        gemm_pn_exact<E>(dv, pf, kept_all, sgo + col0, L.ldv);
      } else {
        gemm_an<E>(dv, pa, sgo + col0, L.ldv, groups);
      }
      if (q_bad) {
        float dsf[KC][4];
        TM_UNROLL
        for (int kk = 0; kk < KC / 2; ++kk) unpack_a_fragment<E>(dsf, dsa[kk], kk);
        gemm_pn_exact<E>(dk, dsf, kept_all, sq + col0, L.ldq);
      } else {
        gemm_an<E>(dk, dsa, sq + col0, L.ldq, groups);
      }
      sync_threads();  // every warp is done with Q, dO, the exchange and the step's metadata
      st = tile.next(p, st);
      if (st.valid) load_step(st);
      cp_async_commit_group();
    }
    cp_async_wait_group<0>();
    if (exact) break;
    block_any_vote(votes + kBlockWarps, any_nonfinite_acc(dk) || any_nonfinite_acc(dv));
    sync_threads();  // every warp is done with the last step (pass 1 reloads Q and dO)
    if (!block_any_result<kBlockWarps>(votes + kBlockWarps)) break;
  }
  // Gradient rows are contiguous.
  global_ptr<T> gk(static_cast<T*>(tile.grad(p, Operand::kK))),
      gv(static_cast<T*>(tile.grad(p, Operand::kV)));
  TM_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    const int r = kw * 16 + (lane >> 2) + 8 * ri;
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

}  // namespace tokenmix::cuda
