// Chunked (gated) delta rule on the CPU, forward and backward.
//
// Per token: S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T with
// a_t = e^{g_t}, o_t = S_t^T (scale q_t). Within a chunk, with G_i the
// cumulative log decay from the chunk start and S_0 the incoming state, the
// corrected values u_i = b_i (v_i - (a_i S_{i-1})^T k_i) solve a unit lower
// triangular system (the UT/WY representation):
//
//   (I + L) U = R,   L_ij = b_i Gamma_ij (k_i . k_j)   (j < i)
//                    R_i  = b_i (v_i - e^{G_i} S_0^T k_i)
//   O   = diag(e^G) Q S_0 + (Q K^T o Gamma)_{j<=i} U,   Gamma_ij = e^{D_ij}
//   S_c = e^{G_c} S_0 + (K o e^{E})^T U
//
// so a chunk costs a few small GEMMs plus one triangular solve, never a
// token-by-token state update. The log decays are summed over their own
// ranges (G_i = sum_{t<=i} g_t, E_j = sum_{t>j} g_t, D_ij = sum_{j<t<=i} g_t;
// see linear_scan_engine.h): exact after resets, -inf included, and every
// exponent is <= 0 for g <= 0. Masked products skip the zero triangle when a
// value is not finite (triangular_gemm). The backward
// recomputes each chunk from its saved start state and differentiates these
// equations (a transposed triangular solve for dR); decay gradients are
// accumulated per position and reverse-summed within the chunk, since a
// chunk only sees its own g through G.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "tokenmix/cpu/gemm.h"
#include "tokenmix/cpu/linear_scan_engine.h"
#include "tokenmix/cpu/simd.h"
#include "tokenmix/linear_scan_problem.h"
#include "tokenmix/scan_chunk_math.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

template <class In, class T>
struct DeltaEngine : ScanShape<T> {
  using V = typename Simd<T>::V;
  using ScanShape<T>::W;
  using ScanShape<T>::kChunk;
  using ScanShape<T>::K;
  using ScanShape<T>::Vd;
  using ScanShape<T>::kp;
  using ScanShape<T>::vp;
  using ScanShape<T>::cp;
  using ScanShape<T>::scale;

  const LinearScanProblem& p;

  explicit DeltaEngine(const LinearScanProblem& prob) : ScanShape<T>(prob), p(prob) {}

  struct Work {
    // chunk inputs and factors
    Buffer<T> q, k, kt, v, qg, kd, G, lg, run, eg, ekd, beta;
    // forward intermediates
    Buffer<T> P, R, U, Ut, KK, A, Gam, o, S, states;
    // backward
    Buffer<T> St, dSt, dO, dU, dA, dR, dL, dP, dq, dk, dv, dS, dKh, dG, dbeta, tmp;
  };

  void init(Work& w, bool backward, int64_t max_chunks) const {
    const int C = kChunk;
    for (Buffer<T>* b : {&w.q, &w.k, &w.qg, &w.kd}) b->assign(size_t(C) * kp, T(0));
    w.kt.assign(size_t(kp) * cp, T(0));
    for (Buffer<T>* b : {&w.v, &w.P, &w.R, &w.U, &w.o}) b->assign(size_t(C) * vp, T(0));
    w.Ut.assign(size_t(vp) * cp, T(0));
    w.KK.assign(size_t(C) * cp, T(0));
    w.A.assign(size_t(C) * cp, T(0));
    w.Gam.assign(size_t(C) * cp, T(0));
    w.G.assign(size_t(cp), T(0));
    w.lg.assign(size_t(C), T(0));
    w.run.assign(size_t(cp), T(0));
    w.eg.assign(size_t(C), T(0));
    w.ekd.assign(size_t(C), T(0));
    w.beta.assign(size_t(C), T(0));
    w.S.assign(size_t(K) * vp, T(0));
    if (backward) {
      w.St.assign(size_t(Vd) * kp, T(0));
      w.dSt.assign(size_t(Vd) * kp, T(0));
      for (Buffer<T>* b : {&w.dO, &w.dU, &w.dR, &w.dP, &w.dv}) b->assign(size_t(C) * vp, T(0));
      for (Buffer<T>* b : {&w.dq, &w.dk, &w.dKh, &w.tmp}) b->assign(size_t(C) * kp, T(0));
      w.dA.assign(size_t(C) * cp, T(0));
      w.dL.assign(size_t(C) * cp, T(0));
      w.dS.assign(size_t(K) * vp, T(0));
      w.dG.assign(size_t(C), T(0));
      w.dbeta.assign(size_t(C), T(0));
      w.states.assign(size_t(max_chunks + 1) * K * vp, T(0));
    }
  }

  T gamma(const Work& w, int i, int j) const { return w.Gam[int64_t(i) * cp + j]; }

  void load_state(T* S, const void* src, int64_t n, int64_t h) const {
    load_scan_state(p, vp, S, src, n, h);
  }
  void store_state(const T* S, void* dst, int64_t n, int64_t h) const {
    store_scan_state(p, vp, S, dst, n, h);
  }

  // Loads the chunk and everything that does not depend on the state:
  // G, e^G, beta, qg = q e^G, kd = k e^{G_c - G}, KK_ij = Gamma_ij k_i.k_j
  // (j < i), A_ij = Gamma_ij q_i.k_j (j <= i).
  void load_chunk(Work& w, int64_t b, int64_t h, int64_t t0, int c) const {
    for (int i = 0; i < kChunk; ++i) {
      T* qr = w.q.data() + int64_t(i) * kp;
      T* kr = w.k.data() + int64_t(i) * kp;
      T* vr = w.v.data() + int64_t(i) * vp;
      fill(qr, qr + kp, T(0));
      fill(kr, kr + kp, T(0));
      fill(vr, vr + vp, T(0));
      w.beta[i] = 0;
      if (i >= c) continue;
      const int64_t t = t0 + i;
      const In* qs =
          static_cast<const In*>(p.q) + b * p.q_stride[0] + t * p.q_stride[1] + h * p.q_stride[2];
      const In* ks =
          static_cast<const In*>(p.k) + b * p.k_stride[0] + t * p.k_stride[1] + h * p.k_stride[2];
      const In* vs =
          static_cast<const In*>(p.v) + b * p.v_stride[0] + t * p.v_stride[1] + h * p.v_stride[2];
      for (int d = 0; d < K; ++d) qr[d] = T(to_float(qs[d])) * scale;
      for (int d = 0; d < K; ++d) kr[d] = T(to_float(ks[d]));
      for (int e = 0; e < Vd; ++e) vr[e] = T(to_float(vs[e]));
      w.beta[i] = static_cast<const T*>(p.beta)[(b * p.seq_len + t) * p.heads + h];
    }
    // Log decays (natural units) from the chunk start (G, eg = e^G) and to the
    // chunk end (ekd = e^E), each summed over its own range.
    // (the factors by tokenmix/scan_chunk_math.h, shared with the CUDA kernels)
    T acc = 0;
    for (int i = 0; i < kChunk; ++i) {
      w.lg[i] = (p.g && i < c) ? static_cast<const T*>(p.g)[(b * p.seq_len + t0 + i) * p.heads + h]
                               : T(0);
      acc += w.lg[i];
      w.G[i] = acc;
    }
    const auto lg = [&](int i) { return w.lg[i]; };
    const auto exp = [](T x) { return T(std::exp(double(x))); };
    chunk_prefix_decays<T>(kChunk, c, lg, [&](int i, T f) { w.eg[i] = f; }, exp);
    chunk_suffix_decays<T>(kChunk, c, lg, [&](int j, T f) { w.ekd[j] = f; }, exp);
    for (int i = 0; i < kChunk; ++i)
      for (int d = 0; d < kp; ++d) {
        w.qg[int64_t(i) * kp + d] = w.q[int64_t(i) * kp + d] * w.eg[i];
        w.kd[int64_t(i) * kp + d] = w.k[int64_t(i) * kp + d] * w.ekd[i];
      }
    for (int d = 0; d < kp; ++d)
      for (int j = 0; j < cp; ++j)
        w.kt[int64_t(d) * cp + j] = j < kChunk ? w.k[int64_t(j) * kp + d] : T(0);
    gemm<T>(kChunk, cp, K, StridedRows<const T>{w.k.data(), kp}, 1,
            StridedRows<const T>{w.kt.data(), cp}, StridedRows<T>{w.KK.data(), cp}, false);
    gemm<T>(kChunk, cp, K, StridedRows<const T>{w.q.data(), kp}, 1,
            StridedRows<const T>{w.kt.data(), cp}, StridedRows<T>{w.A.data(), cp}, false);
    // Gamma_ij = e^{D_ij} for j <= i < c (running pairwise sums in log2 units,
    // vectorized; 0 elsewhere).
    T* run = w.run.data();
    fill(run, run + cp, T(0));
    for (int i = 0; i < kChunk; ++i) {
      T* row = w.Gam.data() + int64_t(i) * cp;
      fill(row, row + cp, T(0));
      if (i >= c) continue;
      pairwise_decay_row(run, w.lg[i] * T(1.4426950408889634), i,
                         [&](int j, V e) { vstore(row + j, e); });
      for (int j = i + 1; j < cp; ++j) row[j] = 0;
    }
    for (int i = 0; i < kChunk; ++i)
      for (int j = 0; j < cp; ++j) {
        const bool in = i < c && j <= i;
        const T gm = in ? gamma(w, i, j) : T(0);
        w.KK[int64_t(i) * cp + j] = (in && j < i) ? w.KK[int64_t(i) * cp + j] * gm : T(0);
        w.A[int64_t(i) * cp + j] = in ? w.A[int64_t(i) * cp + j] * gm : T(0);
      }
  }

  // P = K S0, R = beta (v - e^G P), U = (I + L)^{-1} R with L_ij = beta_i KK_ij.
  void solve_values(Work& w, const T* S0, int c) const {
    gemm<T>(c, vp, K, StridedRows<const T>{w.k.data(), kp}, 1, StridedRows<const T>{S0, vp},
            StridedRows<T>{w.P.data(), vp}, false);
    for (int i = 0; i < kChunk; ++i) {
      T* r = w.R.data() + int64_t(i) * vp;
      T* u = w.U.data() + int64_t(i) * vp;
      if (i >= c) {
        fill(r, r + vp, T(0));
        fill(u, u + vp, T(0));
        continue;
      }
      const T* pv = w.P.data() + int64_t(i) * vp;
      const T* vv = w.v.data() + int64_t(i) * vp;
      const V bi = vbroadcast<V>(w.beta[i]), ei = vbroadcast<V>(w.eg[i]);
      for (int e = 0; e < vp; e += W) {
        const V rv = bi * (vload<V>(vv + e) - ei * vload<V>(pv + e));
        vstore(r + e, rv);
        vstore(u + e, rv);
      }
      // forward substitution: u_i -= sum_{j<i} L_ij u_j
      for (int j = 0; j < i; ++j) {
        const V l = vbroadcast<V>(w.beta[i] * w.KK[int64_t(i) * cp + j]);
        const T* uj = w.U.data() + int64_t(j) * vp;
        for (int e = 0; e < vp; e += W) vstore(u + e, vload<V>(u + e) - l * vload<V>(uj + e));
      }
    }
  }

  void forward_task(Work& w, int64_t n, int64_t h) const {
    int64_t b, begin, end;
    p.sequence(n, &b, &begin, &end);
    T* S = w.S.data();
    load_state(S, p.initial_state, n, h);
    In* out = static_cast<In*>(p.out);
    for (int64_t t0 = begin; t0 < end; t0 += kChunk) {
      const int c = int(min_of<int64_t>(kChunk, end - t0));
      load_chunk(w, b, h, t0, c);
      solve_values(w, S, c);
      T* o = w.o.data();
      gemm<T>(c, vp, K, StridedRows<const T>{w.qg.data(), kp}, 1, StridedRows<const T>{S, vp},
              StridedRows<T>{o, vp}, false);
      triangular_gemm<T>(Triangle::kLower, c, vp, c, StridedRows<const T>{w.A.data(), cp}, 1,
                         StridedRows<const T>{w.U.data(), vp}, StridedRows<T>{o, vp}, true);
      for (int i = 0; i < c; ++i) {
        In* dst = out + ((b * p.seq_len + t0 + i) * p.heads + h) * Vd;
        for (int e = 0; e < Vd; ++e) dst[e] = from_float<In>(o[int64_t(i) * vp + e]);
      }
      advance(w, S, c);
    }
    if (p.final_state) store_state(S, p.final_state, n, h);
  }

  // S = e^{G_c} S + kd^T U
  void advance(Work& w, T* S, int c) const {
    const T f = T(std::exp(double(w.G[c - 1])));
    for (int64_t x = 0; x < int64_t(K) * vp; ++x) S[x] *= f;
    gemm<T>(K, vp, c, StridedRows<const T>{w.kd.data(), 1}, kp,
            StridedRows<const T>{w.U.data(), vp}, StridedRows<T>{S, vp}, true);
  }

  void backward_task(Work& w, int64_t n, int64_t h) const {
    int64_t b, begin, end;
    p.sequence(n, &b, &begin, &end);
    const int64_t chunks = (end - begin + kChunk - 1) / kChunk;
    const int64_t ssize = int64_t(K) * vp;
    load_state(w.states.data(), p.initial_state, n, h);
    for (int64_t ci = 0; ci < chunks; ++ci) {
      const int64_t t0 = begin + ci * kChunk;
      const int c = int(min_of<int64_t>(kChunk, end - t0));
      T* cur = w.states.data() + ci * ssize;
      T* next = cur + ssize;
      for (int64_t x = 0; x < ssize; ++x) next[x] = cur[x];
      load_chunk(w, b, h, t0, c);
      solve_values(w, cur, c);
      advance(w, next, c);
    }
    T* dS = w.dS.data();
    load_state(dS, p.grad_final_state, n, h);
    In* gq = static_cast<In*>(p.grad_q);
    In* gk = static_cast<In*>(p.grad_k);
    In* gv = static_cast<In*>(p.grad_v);
    T* gbeta = static_cast<T*>(p.grad_beta);
    T* gg = static_cast<T*>(p.grad_g);
    const In* go = static_cast<const In*>(p.grad_out);

    for (int64_t ci = chunks - 1; ci >= 0; --ci) {
      const int64_t t0 = begin + ci * kChunk;
      const int c = int(min_of<int64_t>(kChunk, end - t0));
      const T* S0 = w.states.data() + ci * ssize;
      load_chunk(w, b, h, t0, c);
      solve_values(w, S0, c);
      for (int i = 0; i < kChunk; ++i) {
        T* r = w.dO.data() + int64_t(i) * vp;
        fill(r, r + vp, T(0));
        if (i >= c) continue;
        const In* src = go + ((b * p.seq_len + t0 + i) * p.heads + h) * Vd;
        for (int e = 0; e < Vd; ++e) r[e] = T(to_float(src[e]));
      }
      for (int e = 0; e < vp; ++e)
        for (int j = 0; j < cp; ++j)
          w.Ut[int64_t(e) * cp + j] = j < kChunk ? w.U[int64_t(j) * vp + e] : T(0);
      for (int e = 0; e < Vd; ++e)
        for (int d = 0; d < kp; ++d) {
          w.St[int64_t(e) * kp + d] = d < K ? S0[int64_t(d) * vp + e] : T(0);
          w.dSt[int64_t(e) * kp + d] = d < K ? dS[int64_t(d) * vp + e] : T(0);
        }
      const T Gc = w.G[c - 1], eGc = T(std::exp(double(Gc)));
      T* dG = w.dG.data();
      T* dbeta = w.dbeta.data();
      fill(w.dG.begin(), w.dG.end(), T(0));
      fill(w.dbeta.begin(), w.dbeta.end(), T(0));

      // dG_c from S_c = e^{G_c} S0 + ...: sum(dS * e^{G_c} S0)
      {
        T acc = 0;
        for (int d = 0; d < K; ++d)
          for (int e = 0; e < Vd; ++e) acc += dS[int64_t(d) * vp + e] * S0[int64_t(d) * vp + e];
        dG[c - 1] += acc * eGc;
      }
      // dU = A^T dO + kd dS ; dKh = U dS^T (gradient of kd)
      T* dU = w.dU.data();
      triangular_gemm<T>(Triangle::kUpper, c, vp, c, StridedRows<const T>{w.A.data(), 1}, cp,
                         StridedRows<const T>{w.dO.data(), vp}, StridedRows<T>{dU, vp}, false);
      gemm<T>(c, vp, K, StridedRows<const T>{w.kd.data(), kp}, 1, StridedRows<const T>{dS, vp},
              StridedRows<T>{dU, vp}, true);
      T* dKh = w.dKh.data();
      gemm<T>(c, kp, Vd, StridedRows<const T>{w.U.data(), vp}, 1,
              StridedRows<const T>{w.dSt.data(), kp}, StridedRows<T>{dKh, kp}, false);
      // kd_j = k_j e^{G_c - G_j}: dG_c += sum_j dKh_j . kd_j, dG_j -= dKh_j . kd_j
      for (int j = 0; j < c; ++j) {
        T dot = 0;
        for (int d = 0; d < K; ++d) dot += dKh[int64_t(j) * kp + d] * w.kd[int64_t(j) * kp + d];
        dG[c - 1] += dot;
        dG[j] -= dot;
      }
      // dA = dO U^T (j <= i); E = dA o A feeds dG; dA o Gamma feeds dq, dk.
      T* dA = w.dA.data();
      gemm<T>(kChunk, cp, Vd, StridedRows<const T>{w.dO.data(), vp}, 1,
              StridedRows<const T>{w.Ut.data(), cp}, StridedRows<T>{dA, cp}, false);
      for (int i = 0; i < kChunk; ++i)
        for (int j = 0; j < cp; ++j) {
          T& x = dA[int64_t(i) * cp + j];
          if (i >= c || j > i) {
            x = 0;
            continue;
          }
          const T e = x * w.A[int64_t(i) * cp + j];
          dG[i] += e;
          dG[j] -= e;
          x *= gamma(w, i, j);
        }
      // dR: solve (I + L)^T dR = dU (back substitution).
      T* dR = w.dR.data();
      for (int i = kChunk - 1; i >= 0; --i) {
        T* r = dR + int64_t(i) * vp;
        if (i >= c) {
          fill(r, r + vp, T(0));
          continue;
        }
        for (int e = 0; e < vp; ++e) r[e] = dU[int64_t(i) * vp + e];
        for (int j = i + 1; j < c; ++j) {
          const V l = vbroadcast<V>(w.beta[j] * w.KK[int64_t(j) * cp + i]);
          const T* rj = dR + int64_t(j) * vp;
          for (int e = 0; e < vp; e += W) vstore(r + e, vload<V>(r + e) - l * vload<V>(rj + e));
        }
      }
      // dL_ij = -dR_i . u_j (j < i); L_ij = beta_i KK_ij.
      T* dL = w.dL.data();
      gemm<T>(kChunk, cp, Vd, StridedRows<const T>{dR, vp}, 1,
              StridedRows<const T>{w.Ut.data(), cp}, StridedRows<T>{dL, cp}, false);
      for (int i = 0; i < kChunk; ++i)
        for (int j = 0; j < cp; ++j) {
          T& x = dL[int64_t(i) * cp + j];
          if (i >= c || j >= i) {
            x = 0;
            continue;
          }
          x = -x;
          const T kk = w.KK[int64_t(i) * cp + j];
          dbeta[i] += x * kk;
          const T f = x * w.beta[i] * kk;  // dL o L: through Gamma_ij
          dG[i] += f;
          dG[j] -= f;
          x *= w.beta[i] * gamma(w, i, j);  // D_ij: coefficient of k_i . k_j
        }
      // R_i = beta_i (v_i - e^{G_i} p_i): dbeta, dv, dP, dG.
      T* dP = w.dP.data();
      T* dv = w.dv.data();
      for (int i = 0; i < kChunk; ++i) {
        T* dpr = dP + int64_t(i) * vp;
        T* dvr = dv + int64_t(i) * vp;
        if (i >= c) {
          fill(dpr, dpr + vp, T(0));
          fill(dvr, dvr + vp, T(0));
          continue;
        }
        T rb = 0, rp = 0;
        for (int e = 0; e < Vd; ++e) {
          const T dr = dR[int64_t(i) * vp + e];
          const T pe = w.P[int64_t(i) * vp + e];
          rb += dr * (w.v[int64_t(i) * vp + e] - w.eg[i] * pe);
          rp += dr * pe;
        }
        dbeta[i] += rb;
        dG[i] -= w.beta[i] * w.eg[i] * rp;
        for (int e = 0; e < vp; ++e) {
          dvr[e] = w.beta[i] * dR[int64_t(i) * vp + e];
          dpr[e] = -w.beta[i] * w.eg[i] * dR[int64_t(i) * vp + e];
        }
      }
      // dq = e^G (dO S0^T) + (dA o Gamma) K ; dG_i += e^{G_i} dO_i . (S0^T q_i)
      T* dq = w.dq.data();
      gemm<T>(c, kp, Vd, StridedRows<const T>{w.dO.data(), vp}, 1,
              StridedRows<const T>{w.St.data(), kp}, StridedRows<T>{dq, kp}, false);
      for (int i = 0; i < c; ++i) {
        T dot = 0;
        for (int d = 0; d < K; ++d) {
          dot += dq[int64_t(i) * kp + d] * w.qg[int64_t(i) * kp + d];
          dq[int64_t(i) * kp + d] *= w.eg[i];
        }
        dG[i] += dot;
      }
      triangular_gemm<T>(Triangle::kLower, c, kp, c, StridedRows<const T>{dA, cp}, 1,
                         StridedRows<const T>{w.k.data(), kp}, StridedRows<T>{dq, kp}, true);
      // dk = (dA o Gamma)^T Q + dKh e^{G_c - G} + (D + D^T) K + dP S0^T
      T* dk = w.dk.data();
      triangular_gemm<T>(Triangle::kUpper, c, kp, c, StridedRows<const T>{dA, 1}, cp,
                         StridedRows<const T>{w.q.data(), kp}, StridedRows<T>{dk, kp}, false);
      for (int j = 0; j < c; ++j) {
        const T f = w.ekd[j];
        for (int d = 0; d < kp; ++d) dk[int64_t(j) * kp + d] += dKh[int64_t(j) * kp + d] * f;
      }
      triangular_gemm<T>(Triangle::kLower, c, kp, c, StridedRows<const T>{dL, cp}, 1,
                         StridedRows<const T>{w.k.data(), kp}, StridedRows<T>{dk, kp}, true);
      triangular_gemm<T>(Triangle::kUpper, c, kp, c, StridedRows<const T>{dL, 1}, cp,
                         StridedRows<const T>{w.k.data(), kp}, StridedRows<T>{dk, kp}, true);
      gemm<T>(c, kp, Vd, StridedRows<const T>{dP, vp}, 1, StridedRows<const T>{w.St.data(), kp},
              StridedRows<T>{dk, kp}, true);
      // dS0 = e^{G_c} dS + qg^T dO + K^T dP
      for (int64_t x = 0; x < ssize; ++x) dS[x] *= eGc;
      gemm<T>(K, vp, c, StridedRows<const T>{w.qg.data(), 1}, kp,
              StridedRows<const T>{w.dO.data(), vp}, StridedRows<T>{dS, vp}, true);
      gemm<T>(K, vp, c, StridedRows<const T>{w.k.data(), 1}, kp, StridedRows<const T>{dP, vp},
              StridedRows<T>{dS, vp}, true);
      // Store; dg_t = sum_{i >= t in chunk} dG_i.
      T run = 0;
      for (int i = c - 1; i >= 0; --i) {
        run += dG[i];
        const int64_t t = t0 + i;
        const int64_t row = (b * p.seq_len + t) * p.heads + h;
        if (gg) gg[row] = run;
        gbeta[row] = dbeta[i];
        for (int d = 0; d < K; ++d)
          gq[row * K + d] = from_float<In>(dq[int64_t(i) * kp + d] * scale);
        for (int d = 0; d < K; ++d) gk[row * K + d] = from_float<In>(dk[int64_t(i) * kp + d]);
        for (int e = 0; e < Vd; ++e) gv[row * Vd + e] = from_float<In>(dv[int64_t(i) * vp + e]);
      }
    }
    if (p.grad_initial_state) store_state(dS, p.grad_initial_state, n, h);
  }
};

template <class In, class T>
void delta_rule_impl(const LinearScanProblem& p, bool backward) {
  const DeltaEngine<In, T> eng(p);
  const int64_t max_chunks = longest_sequence_chunks(p, eng.kChunk);
  run_parallel(p, p.num_seqs * p.heads, 1, [&](int64_t begin, int64_t end) {
    typename DeltaEngine<In, T>::Work w;
    eng.init(w, backward, max_chunks);
    for (int64_t t = begin; t < end; ++t) {
      if (backward)
        eng.backward_task(w, t / p.heads, t % p.heads);
      else
        eng.forward_task(w, t / p.heads, t % p.heads);
    }
  });
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
