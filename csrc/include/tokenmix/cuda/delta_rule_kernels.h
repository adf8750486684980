// The chunked (gated) delta rule on CUDA, on the SIMT layer: the algorithm of the CPU kernels
// (tokenmix/cpu/delta_rule_engine.h) with the work split of the linear scans
// (linear_scan_kernels.h): one block per (sequence, head, block of kScanValues value columns),
// the state slice in shared memory, chunks of kScanChunk tokens read in slices of kScanKeys keys,
// the matrix products as warp products (scan_tiles.h: tf32 tensor cores for fp16/bf16, FMAs for
// float32), the triangular solves and the per-element passes in float32 FMAs.
//
// Per chunk, with G_i = sum_{t<=i} g_t, E_j = sum_{t>j} g_t and Gamma_ij = e^{D_ij},
// D_ij = sum_{j<t<=i} g_t (each summed over its own range; all 1 without a gate):
//
//   KK_ij = Gamma_ij k_i.k_j (j < i),  A_ij = Gamma_ij q_i.k_j (j <= i),  P = K S0
//   (I + L) U = R,  L_ij = beta_i KK_ij,  R_i = beta_i (v_i - e^{G_i} P_i)
//   O = e^G (Q S0) + A U,  S_c = e^{G_c} S0 + (K e^E)^T U
//
// Everything but KK, A and the decays is per value column, so value blocks split the work
// exactly; the triangular solve runs per value column on 8 lanes (a shuffle reduction per row,
// in a fixed order). The backward walks the chunks in reverse from the states that a states-only
// forward pass stored, differentiates these equations like the CPU kernels (a transposed solve
// for dR), and writes each value block's shares of dq, dk and of each token's dL/dG and dL/dbeta;
// scan_reduce_kernel and delta_token_grad_kernel add the shares in block order (dL/dG reverse-
// cumulated within each chunk, since a chunk sees its own gates only through G). No atomics.
#pragma once

#include <cmath>
#include <cstdint>

#include "tokenmix/cuda/linear_scan_kernels.h"

namespace tokenmix::cuda {

// The block's shared memory: the swizzled matrices S, v, U, P, A, KK, q, k and the per-token
// scalars; the backward adds dO, dU, dA, dL, the chunk-start state's slice and the per-token
// gradient terms (S then holds dL/dS). The layout is delta_smem_floats' (scan_layout.h).
struct DeltaSmem {
  ScanMat S, v, U, P, A, KK, q, k;
  shared_ptr<float> beta, lg, eg, ekd;  // [C] each
  ScanMat dO, dU, dA, dL, s0;
  shared_ptr<float> dG, dbeta, colE, colF, dot, red;  // [C] each, red [threads]
};

TM_DEVICE DeltaSmem delta_smem(int64_t key_pad, bool backward) {
  constexpr int C = kScanChunk, BK = kScanKeys, BV = kScanValues;
  SmemCarver m;
  DeltaSmem s;
  s.S = m.matrix(key_pad, BV);
  s.v = m.matrix(C, BV);
  s.U = m.matrix(C, BV);
  s.P = m.matrix(C, BV);
  s.A = m.matrix(C, C);
  s.KK = m.matrix(C, C);
  s.q = m.matrix(C, BK);
  s.k = m.matrix(C, BK);
  s.beta = m.array(C);
  s.lg = m.array(C);
  s.eg = m.array(C);
  s.ekd = m.array(C);
  if (backward) {
    s.dO = m.matrix(C, BV);
    s.dU = m.matrix(C, BV);
    s.dA = m.matrix(C, C);
    s.dL = m.matrix(C, C);
    s.s0 = m.matrix(BK, BV);
    s.dG = m.array(C);
    s.dbeta = m.array(C);
    s.colE = m.array(C);
    s.colF = m.array(C);
    s.dot = m.array(C);
    s.red = m.array(kScanThreads);
  }
  return s;
}

// Key columns [d0, d0 + BK) of the chunk's q (scaled) and k, zeros outside. Ends with a barrier.
template <class E>
TM_DEVICE void delta_load_keys(const ScanParams& p, const DeltaSmem& s, int64_t b, int64_t h,
                               int64_t t0, int c, int64_t d0) {
  constexpr int BK = kScanKeys;
  for (int x = int(thread_idx().x); x < kScanChunk * BK; x += kScanThreads) {
    const int i = x / BK, dd = x % BK;
    const int64_t d = d0 + dd;
    const bool in = i < c && d < p.key_dim;
    s.q.set(i, dd, in ? scan_read<E>(p.q, p.q_stride, b, t0 + i, h, d) * p.scale : 0.0f);
    s.k.set(i, dd, in ? scan_read<E>(p.k, p.k_stride, b, t0 + i, h, d) : 0.0f);
  }
  sync_threads();
}

// beta, the log decays (natural units), e^{G_i} (0 past c) and e^{E_j} (0 past c).
TM_DEVICE void delta_load_scalars(const ScanParams& p, const DeltaSmem& s, int64_t b, int64_t h,
                                  int64_t t0, int c) {
  const int tid = int(thread_idx().x);
  if (tid < kScanChunk) {
    const int64_t at = (b * p.seq_len + t0 + tid) * p.heads + h;
    s.beta[tid] = tid < c ? float(global_ptr<const float>(p.beta)[at]) : 0.0f;
    s.lg[tid] = (p.g && tid < c) ? float(global_ptr<const float>(p.g)[at]) : 0.0f;
  }
  sync_threads();
  // e^G and e^E by two threads (tokenmix/scan_chunk_math.h, shared with the CPU).
  const auto lg = [&](int i) { return float(s.lg[i]); };
  const auto exp = [](float x) { return expf(x); };
  if (tid == 0)
    chunk_prefix_decays<float>(kScanChunk, c, lg, [&](int i, float f) { s.eg[i] = f; }, exp);
  else if (tid == 32)
    chunk_suffix_decays<float>(kScanChunk, c, lg, [&](int j, float f) { s.ekd[j] = f; }, exp);
  sync_threads();
}

// Gamma_ij = e^{D_ij} for j <= i (D_ij = sum_{j<t<=i} g_t running down column j).
struct DeltaGamma {
  float run = 0.0f;
  TM_DEVICE float next(const DeltaSmem& s, int i, int j) {
    if (i > j) run += float(s.lg[i]) * kScanLog2e;
    return exp2f(run);
  }
};

// KK and A from their tiles: KK_ij = Gamma_ij kk for j < i < c, A_ij = Gamma_ij a for
// j <= i < c, 0 elsewhere (assigned, never multiplied).
TM_DEVICE void delta_mask_scores(const DeltaSmem& s, int c) {
  const int j = int(thread_idx().x);
  if (j < kScanChunk) {
    DeltaGamma gamma;
    for (int i = 0; i < kScanChunk; ++i) {
      if (i < j || i >= c) {
        s.KK.set(i, j, 0.0f);
        s.A.set(i, j, 0.0f);
        continue;
      }
      const float gm = gamma.next(s, i, j);
      s.KK.set(i, j, i > j ? s.KK(i, j) * gm : 0.0f);
      s.A.set(i, j, s.A(i, j) * gm);
    }
  }
  sync_threads();
}

// U = (I + L)^{-1} U in place (forward substitution, rows in order), L_ij = beta_i KK_ij. Thread
// (column e = t / 8, lane g = t % 8): the 8 lanes of a column split the sum over j and add their
// parts by shuffles in a fixed order; lane 0 writes the row.
TM_DEVICE void delta_solve(const DeltaSmem& s, int c) {
  const int tid = int(thread_idx().x), e = tid / 8, g = tid % 8;
  for (int i = 1; i < c; ++i) {
    float part = 0.0f;
    for (int j = g; j < i; j += 8) part += s.KK(i, j) * s.U(j, e);
    part += shfl_xor_sync(0xffffffffu, part, 1);
    part += shfl_xor_sync(0xffffffffu, part, 2);
    part += shfl_xor_sync(0xffffffffu, part, 4);
    if (g == 0) s.U.set(i, e, s.U(i, e) - float(s.beta[i]) * part);
    sync_warp();
  }
  sync_threads();
}

// dR = (I + L)^{-T} dU in place (back substitution): dR_i = dU_i - sum_{j>i} beta_j KK_ji dR_j.
TM_DEVICE void delta_solve_transposed(const DeltaSmem& s, int c) {
  const int tid = int(thread_idx().x), e = tid / 8, g = tid % 8;
  for (int i = c - 2; i >= 0; --i) {
    float part = 0.0f;
    for (int j = i + 1 + g; j < c; j += 8) part += float(s.beta[j]) * s.KK(j, i) * s.dU(j, e);
    part += shfl_xor_sync(0xffffffffu, part, 1);
    part += shfl_xor_sync(0xffffffffu, part, 2);
    part += shfl_xor_sync(0xffffffffu, part, 4);
    if (g == 0) s.dU.set(i, e, s.dU(i, e) - part);
    sync_warp();
  }
  sync_threads();
}

// The chunk's recomputation shared by both directions, from the state S0 (the block's smem state
// in the forward; the stored chunk-start state, slice by slice, in the backward): KK, A, P and
// U. Forward: also qs, the warp's output tile of Q S0. Backward: the thread's partial sum of
// dS * S0 into *ds_s0.
template <class E, bool kBackward>
TM_DEVICE void delta_chunk(const ScanParams& p, const DeltaSmem& s, const ScanBlock& blk,
                           int64_t t0, int c, global_ptr<const float> s0_src, float (&qs)[2][4],
                           float* ds_s0) {
  constexpr int BK = kScanKeys, BV = kScanValues;
  constexpr bool kTC = E::kTensorCore;
  const int tid = int(thread_idx().x);
  const ScanWarpTiles wt = scan_warp_tiles();
  const FragLane f = frag_lane();
  float kk_acc[4][4] = {}, a_acc[4][4] = {}, p_acc[2][4] = {};
  for (int d0 = 0; d0 < int(p.key_pad); d0 += BK) {
    if constexpr (kBackward) {
      for (int x = tid; x < BK * BV; x += kScanThreads) {
        const float v0 = s0_src[d0 * BV + x];
        s.s0.set(x / BV, x % BV, v0);
        *ds_s0 += s.S(d0 + x / BV, x % BV) * v0;
      }
    }
    delta_load_keys<E>(p, s, blk.b, blk.h, t0, c, d0);
    scan_scores_nt<kTC>(wt, s.k, s.k, BK, kk_acc);
    scan_scores_nt<kTC>(wt, s.q, s.k, BK, a_acc);
    const auto state = [&](int d, int e) {
      if constexpr (kBackward)
        return s.s0(d, wt.on0 + e);
      else
        return s.S(d0 + d, wt.on0 + e);
    };
    warp_product<kTC, 2>(p_acc, 0, BK, [&](int r, int d) { return s.k(wt.om0 + r, d); }, state);
    if constexpr (!kBackward)
      warp_product<kTC, 2>(qs, 0, BK, [&](int r, int d) { return s.q(wt.om0 + r, d); }, state);
    sync_threads();
  }
  frag_store(kk_acc, s.KK, wt.sm0, wt.sn0);
  frag_store(a_acc, s.A, wt.sm0, wt.sn0);
  // R = beta (v - e^G P) into U (rows past c are 0); P kept for the backward.
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = wt.om0 + frag_row(f, i), e = wt.on0 + frag_col(f, n, i);
      s.P.set(r, e, p_acc[n][i]);
      s.U.set(r, e, r < c ? float(s.beta[r]) * (s.v(r, e) - float(s.eg[r]) * p_acc[n][i]) : 0.0f);
    }
  sync_threads();
  delta_mask_scores(s, c);
  delta_solve(s, c);
}

template <class E>
TM_DEVICE void delta_forward_body(const ScanParams& p) {
  constexpr int BK = kScanKeys;
  constexpr bool kTC = E::kTensorCore;
  const ScanBlock blk = scan_block(p);
  const DeltaSmem s = delta_smem(p.key_pad, false);
  const ScanWarpTiles wt = scan_warp_tiles();
  const FragLane f = frag_lane();
  scan_forward_chunks(p, blk, s.S, [&](int64_t t0, int c) {
    scan_load_values<E>(p, p.v, p.v_stride, s.v, blk.b, blk.h, t0, c, blk.e_base);
    delta_load_scalars(p, s, blk.b, blk.h, t0, c);
    float qs[2][4] = {};
    delta_chunk<E, false>(p, s, blk, t0, c, nullptr, qs, nullptr);
    if (!p.states_only) {
      // o = e^G (Q S0) + A U over j <= i (e^G is 0 past c).
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) qs[n][i] *= float(s.eg[wt.om0 + frag_row(f, i)]);
      warp_product_lower<kTC, 2>(
          qs, wt.om0, c, [&](int r, int j) { return s.A(wt.om0 + r, j); },
          [&](int j, int e) { return s.U(j, wt.on0 + e); });
      scan_store_value_tile<E>(p, p.out, blk, t0, c, wt.om0, wt.on0, qs);
    }
    // S = e^{G_c} S0 + (K e^E)^T U, slice by slice.
    const float egc = s.eg[c - 1];
    for (int d0 = 0; d0 < int(p.key_pad); d0 += BK) {
      delta_load_keys<E>(p, s, blk.b, blk.h, t0, c, d0);
      scan_advance_tiles(
          s.S, d0, [&](int) { return egc; },
          [&](float (&acc)[1][4], int m0, int n0) {
            warp_product<kTC, 1>(
                acc, 0, scan_token_end<kTC>(c),
                [&](int r, int j) { return s.k(j, m0 + r) * float(s.ekd[j]); },
                [&](int j, int e) { return s.U(j, n0 + e); });
          });
      sync_threads();
    }
  });
}

// The sums over the columns of a warp's [16 x 16] tile, per row, into half[om0 + row] where
// half is the buffer of the warp's column half (on0 = 0 or 16): the 4 lanes of a row first, by
// shuffles in a fixed order. part[h] holds the lane's share of rows g and g + 8.
TM_DEVICE void delta_row_sums(const ScanWarpTiles& wt, float part[2], shared_ptr<float> lo,
                              shared_ptr<float> hi) {
  const FragLane f = frag_lane();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    part[h] += shfl_xor_sync(0xffffffffu, part[h], 1);
    part[h] += shfl_xor_sync(0xffffffffu, part[h], 2);
    if (f.q == 0) (wt.on0 == 0 ? lo : hi)[wt.om0 + f.g + 8 * h] = part[h];
  }
}

template <class E>
TM_DEVICE void delta_backward_body(const ScanParams& p) {
  constexpr int C = kScanChunk, BK = kScanKeys, BV = kScanValues;
  constexpr bool kTC = E::kTensorCore;
  const ScanBlock blk = scan_block(p);
  const DeltaSmem s = delta_smem(p.key_pad, true);
  const ScanWarpTiles wt = scan_warp_tiles();
  const FragLane f = frag_lane();
  const int tid = int(thread_idx().x);
  const int64_t plane = p.batch * p.seq_len * p.heads * p.key_dim;
  const int64_t token_plane = p.batch * p.seq_len * p.heads;
  const global_ptr<float> dq_out = global_ptr<float>(p.dq_part) + blk.vb * plane;
  const global_ptr<float> dk_out = global_ptr<float>(p.dk_part) + blk.vb * plane;
  const auto nothing_at_end = [](int64_t) {};
  scan_backward_chunks(p, blk, s.S, nothing_at_end, [&](int64_t slot, int64_t t0, int c) {
    const global_ptr<const float> s0_src = scan_state_at(p, slot, blk.h, blk.vb);
    scan_load_values<E>(p, p.v, p.v_stride, s.v, blk.b, blk.h, t0, c, blk.e_base);
    scan_load_values<E>(p, p.grad_out, p.grad_out_stride, s.dO, blk.b, blk.h, t0, c, blk.e_base);
    delta_load_scalars(p, s, blk.b, blk.h, t0, c);
    float ds_s0 = 0.0f;  // this thread's share of sum(dS * S0)
    float unused[2][4];
    delta_chunk<E, true>(p, s, blk, t0, c, s0_src, unused, &ds_s0);
    s.red[tid] = ds_s0;
    // dA = dO U^T; dU = A^T dO (+ (K e^E) dS below).
    {
      float acc[4][4] = {};
      scan_scores_nt<kTC>(wt, s.dO, s.U, BV, acc);
      frag_store(acc, s.dA, wt.sm0, wt.sn0);
    }
    float du[2][4] = {};
    warp_product_upper<kTC, 2>(
        du, wt.om0, c, [&](int r, int i) { return s.A(i, wt.om0 + r); },
        [&](int i, int e) { return s.dO(i, wt.on0 + e); });
    // dU += (K e^E) dS; dot_j = (U_j dS^T) . (k_j e^{E_j}) (kd's gradient, for dL/dG).
    float dot[2] = {};
    for (int d0 = 0; d0 < int(p.key_pad); d0 += BK) {
      delta_load_keys<E>(p, s, blk.b, blk.h, t0, c, d0);
      warp_product<kTC, 2>(
          du, 0, BK, [&](int r, int d) { return s.k(wt.om0 + r, d) * float(s.ekd[wt.om0 + r]); },
          [&](int d, int e) { return s.S(d0 + d, wt.on0 + e); });
      float dkh[2][4] = {};
      warp_product<kTC, 2>(
          dkh, 0, BV, [&](int r, int e) { return s.U(wt.om0 + r, e); },
          [&](int e, int d) { return s.S(d0 + wt.on0 + d, e); });
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wt.om0 + frag_row(f, i);
          dot[i >> 1] += dkh[n][i] * s.k(r, wt.on0 + frag_col(f, n, i)) * float(s.ekd[r]);
        }
      sync_threads();
    }
    // The column halves' row sums of dot go to dot and dG (added in the row pass).
    delta_row_sums(wt, dot, s.dot, s.dG);
    frag_store(du, s.dU, wt.om0, wt.on0);
    sync_threads();
    delta_solve_transposed(s, c);  // dU now holds dR
    {
      float acc[4][4] = {};
      scan_scores_nt<kTC>(wt, s.dU, s.U, BV, acc);
      frag_store(acc, s.dL, wt.sm0, wt.sn0);
    }
    sync_threads();
    // Column pass (thread j): E = dA o A into A, its column sums; x = -dL (j < i) and
    // F = x KK into KK (its beta-weighted column sums); then dA o Gamma and x beta_i Gamma_ij,
    // the coefficients of the dq/dk products.
    if (tid < C) {
      const int j = tid;
      DeltaGamma gamma;
      float col_e = 0.0f, col_f = 0.0f;
      for (int i = 0; i < C; ++i) {
        if (i < j || i >= c) {
          s.A.set(i, j, 0.0f);
          s.KK.set(i, j, 0.0f);
          s.dA.set(i, j, 0.0f);
          s.dL.set(i, j, 0.0f);
          continue;
        }
        const float gm = gamma.next(s, i, j);
        const float da = s.dA(i, j);
        const float e = da * s.A(i, j);
        s.A.set(i, j, e);
        col_e += e;
        s.dA.set(i, j, da * gm);
        const float x = i > j ? -s.dL(i, j) : 0.0f;
        const float fk = x * s.KK(i, j);
        s.KK.set(i, j, fk);
        col_f += float(s.beta[i]) * fk;
        s.dL.set(i, j, x * float(s.beta[i]) * gm);
      }
      s.colE[j] = col_e;
      s.colF[j] = col_f;
    }
    sync_threads();
    // Row pass (thread i): dbeta, dG from E, F, R; then dv = beta dR and P becomes
    // dP = -beta e^G dR.
    if (tid < C) {
      const int i = tid;
      float row_e = 0.0f, row_f = 0.0f;
      for (int j = 0; j < C; ++j) {
        row_e += s.A(i, j);
        row_f += s.KK(i, j);
      }
      float rb = 0.0f, rp = 0.0f;
      const float b_i = s.beta[i], eg_i = s.eg[i];
      for (int e = 0; e < BV; ++e) {
        const float dr = s.dU(i, e), pe = s.P(i, e);
        rb += dr * (s.v(i, e) - eg_i * pe);
        rp += dr * pe;
      }
      const float dot_i = float(s.dot[i]) + float(s.dG[i]);
      s.dot[i] = dot_i;
      s.dbeta[i] = row_f + rb;
      s.dG[i] =
          (row_e - float(s.colE[i])) + (b_i * row_f - float(s.colF[i])) - b_i * eg_i * rp - dot_i;
    }
    sync_threads();
    {
      float dv[2][4];
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wt.om0 + frag_row(f, i), e = wt.on0 + frag_col(f, n, i);
          const float b_r = s.beta[r], dr = s.dU(r, e);
          dv[n][i] = b_r * dr;
          s.P.set(r, e, -b_r * float(s.eg[r]) * dr);
        }
      scan_store_value_tile<E>(p, p.grad_v, blk, t0, c, wt.om0, wt.on0, dv);
    }
    if (tid == 0) {
      // The last token: e^{G_c} sum(dS S0) and every kd's share (S_c = e^{G_c} S0 + kd^T U).
      float total = 0.0f;
      for (int x = 0; x < kScanThreads; ++x) total += float(s.red[x]);
      float dots = 0.0f;
      for (int j = 0; j < c; ++j) dots += float(s.dot[j]);
      s.dG[c - 1] = float(s.dG[c - 1]) + float(s.eg[c - 1]) * total + dots;
    }
    sync_threads();
    // Per slice: the warp's [16 x 16] tiles of dq and dk, then dS moves to the chunk start.
    float qdot[2] = {};
    const float egc = s.eg[c - 1];
    for (int d0 = 0; d0 < int(p.key_pad); d0 += BK) {
      for (int x = tid; x < BK * BV; x += kScanThreads)
        s.s0.set(x / BV, x % BV, s0_src[d0 * BV + x]);
      delta_load_keys<E>(p, s, blk.b, blk.h, t0, c, d0);
      // dq = e^G (dO S0^T) + dA k (j <= i);
      // dk = e^E (U dS^T) + dP S0^T + dL k (j <= i) + dA^T q + dL^T k (i >= j).
      float dq[2][4] = {}, dk[2][4] = {};
      warp_product<kTC, 2>(
          dq, 0, BV, [&](int r, int e) { return s.dO(wt.om0 + r, e); },
          [&](int e, int d) { return s.s0(wt.on0 + d, e); });
      warp_product<kTC, 2>(
          dk, 0, BV, [&](int r, int e) { return s.U(wt.om0 + r, e); },
          [&](int e, int d) { return s.S(d0 + wt.on0 + d, e); });
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wt.om0 + frag_row(f, i), d = wt.on0 + frag_col(f, n, i);
          qdot[i >> 1] += dq[n][i] * s.q(r, d) * float(s.eg[r]);
          dq[n][i] *= float(s.eg[r]);
          dk[n][i] *= float(s.ekd[r]);
        }
      warp_product<kTC, 2>(
          dk, 0, BV, [&](int r, int e) { return s.P(wt.om0 + r, e); },
          [&](int e, int d) { return s.s0(wt.on0 + d, e); });
      warp_product_lower<kTC, 2>(
          dq, wt.om0, c, [&](int r, int j) { return s.dA(wt.om0 + r, j); },
          [&](int j, int d) { return s.k(j, wt.on0 + d); });
      warp_product_lower<kTC, 2>(
          dk, wt.om0, c, [&](int r, int j) { return s.dL(wt.om0 + r, j); },
          [&](int j, int d) { return s.k(j, wt.on0 + d); });
      warp_product_upper<kTC, 2>(
          dk, wt.om0, c, [&](int r, int i) { return s.dA(i, wt.om0 + r); },
          [&](int i, int d) { return s.q(i, wt.on0 + d); });
      warp_product_upper<kTC, 2>(
          dk, wt.om0, c, [&](int r, int i) { return s.dL(i, wt.om0 + r); },
          [&](int i, int d) { return s.k(i, wt.on0 + d); });
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wt.om0 + frag_row(f, i);
          const int64_t d = d0 + wt.on0 + frag_col(f, n, i);
          if (r < c && d < p.key_dim) {
            const int64_t at = ((blk.b * p.seq_len + t0 + r) * p.heads + blk.h) * p.key_dim + d;
            dq_out[at] = dq[n][i];
            dk_out[at] = dk[n][i];
          }
        }
      sync_threads();
      // dS0 = e^{G_c} dS + (q e^G)^T dO + K^T dP for the slice's rows.
      scan_advance_tiles(
          s.S, d0, [&](int) { return egc; },
          [&](float (&acc)[1][4], int m0, int n0) {
            const int end = scan_token_end<kTC>(c);
            warp_product<kTC, 1>(
                acc, 0, end, [&](int r, int i) { return s.q(i, m0 + r) * float(s.eg[i]); },
                [&](int i, int e) { return s.dO(i, n0 + e); });
            warp_product<kTC, 1>(
                acc, 0, end, [&](int r, int i) { return s.k(i, m0 + r); },
                [&](int i, int e) { return s.P(i, n0 + e); });
          });
      sync_threads();
    }
    // qdot's row sums: the column halves into colE and colF (free after the row pass).
    delta_row_sums(wt, qdot, s.colE, s.colF);
    sync_threads();
    if (tid < c) {
      const int64_t at = (blk.b * p.seq_len + t0 + tid) * p.heads + blk.h;
      global_ptr<float>(p.dg_part)[blk.vb * token_plane + at] =
          float(s.dG[tid]) + (float(s.colE[tid]) + float(s.colF[tid]));
      global_ptr<float>(p.dbeta_part)[blk.vb * token_plane + at] = s.dbeta[tid];
    }
    sync_threads();
  });
}

// dbeta and dg from the value blocks' shares (block order); dg reverse-cumulated within each
// chunk of its sequence. One thread per (sequence, head).
TM_DEVICE void delta_token_grad_body(const ScanParams& p) {
  const int64_t token_plane = p.batch * p.seq_len * p.heads;
  const global_ptr<const float> dg_part(p.dg_part), dbeta_part(p.dbeta_part);
  for (int64_t w = grid_thread(); w < p.num_seqs * p.heads; w += grid_threads()) {
    const int64_t n = w / p.heads, h = w % p.heads;
    int64_t b, begin, end;
    scan_sequence(p, n, &b, &begin, &end);
    float acc = 0.0f;
    for (int64_t t = end - 1; t >= begin; --t) {
      const int64_t at = (b * p.seq_len + t) * p.heads + h;
      if ((t - begin) % kScanChunk == kScanChunk - 1) acc = 0.0f;  // a chunk's last token
      float dg = 0.0f, db = 0.0f;
      for (int64_t vb = 0; vb < p.value_blocks; ++vb) {
        dg += float(dg_part[vb * token_plane + at]);
        db += float(dbeta_part[vb * token_plane + at]);
      }
      acc += dg;
      if (p.grad_g) global_ptr<float>(p.grad_g)[at] = acc;
      global_ptr<float>(p.grad_beta)[at] = db;
    }
  }
}

template <class E>
TM_GLOBAL void delta_forward_kernel(ScanParams p) {
  delta_forward_body<E>(p);
}
template <class E>
TM_GLOBAL void delta_backward_kernel(ScanParams p) {
  delta_backward_body<E>(p);
}
TM_GLOBAL void delta_token_grad_kernel(ScanParams p) {
  delta_token_grad_body(p);
}

}  // namespace tokenmix::cuda
