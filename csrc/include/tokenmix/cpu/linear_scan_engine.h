// Chunked linear-attention scans on the CPU: plain, fixed/scalar decay and
// per-key gates (forward and backward).
//
// One task is one (sequence, head). The sequence is cut into chunks of
// kChunk tokens; inside a chunk the output is the quadratic "attention" part
// plus the contribution of the state carried in from earlier chunks:
//
//   o_i   = (q_i * e^{P_i}) S_prev + sum_{j<=i} [q_i . (k_j * e^{D_ij})] v_j
//   S_new = e^{P_last} S_prev + sum_j (k_j * e^{E_j}) v_j^T
//
// with the log decays (per key; scalar decays broadcast) summed over ranges
// inside the chunk: P_i = sum_{t<=i} g_t (from the chunk start), E_j =
// sum_{t>j} g_t (to the chunk end) and D_ij = sum_{j<t<=i} g_t (pairwise).
// Each is accumulated over its own range, never formed as the difference of
// two cumulative sums: after a reset (g = -1e9, or -inf) such a difference
// has lost every digit of the decays that follow, a direct sum has not. With
// g <= 0 every factor is <= 1 and every sum is of one sign, so exact to a
// few ulps of its own size. Masked products skip the zero triangle when a
// value is not finite (triangular_gemm), so an inf or NaN at token t reaches
// no output before t.
//
// Backward (reverse over chunks, with the chunk-start states recomputed by a
// forward pass over the states only) uses the same products, and the decay
// gradients come from the identity dL/dG_i = q_i dq_i - k_i dk_i (+ the final
// state's term at the last token), reverse-cumulated over time.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "tokenmix/cpu/gemm.h"
#include "tokenmix/cpu/parallel.h"
#include "tokenmix/cpu/simd.h"
#include "tokenmix/linear_scan_problem.h"
#include "tokenmix/scan_chunk_math.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

// Dimensions shared by the scan engines: head dims padded to the vector width
// and the chunk length.
template <class T>
struct ScanShape {
  static constexpr int W = Simd<T>::kWidth;
  static constexpr int kChunk = 64;
  int K, Vd, kp, vp, cp;
  T scale;
  explicit ScanShape(const LinearScanProblem& p)
      : K(int(p.key_dim)),
        Vd(int(p.value_dim)),
        kp(round_up(int(p.key_dim), W)),
        vp(round_up(int(p.value_dim), W)),
        cp(round_up(kChunk, W)),
        scale(T(p.scale)) {}
};

// Chunks of the longest sequence: sizes the backward's per-chunk state store.
inline int64_t longest_sequence_chunks(const LinearScanProblem& p, int chunk) {
  int64_t longest = 0;
  for (int64_t n = 0; n < p.num_seqs; ++n) {
    int64_t b, begin, end;
    p.sequence(n, &b, &begin, &end);
    longest = max_of<int64_t>(longest, end - begin);
  }
  return (longest + chunk - 1) / chunk;
}

// Running pairwise log decays of a chunk, one row at a time: moving to row i
// adds lg_i to run[j] for j < i, so run[j] = sum_{j<t<=i} lg_t, accumulated
// over its own range (no difference of cumulative sums); run[j >= i] stays 0
// (the diagonal's factor is 1). Then use(j, 2^run[j .. j+W)) is called for
// every vector up to the one holding the diagonal, in the same pass.
template <class T, class Use>
inline void pairwise_decay_row(T* run, T lg_i, int i, Use&& use) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::kWidth;
  V lane{};
  for (int l = 0; l < W; ++l) lane[l] = T(l);
  const V lg_v = vbroadcast<V>(lg_i), row = vbroadcast<V>(T(i));
  // Lanes j < i add lg_i, the others add 0 (one vector pass, no scalar tail).
  for (int j = 0; j <= i; j += W) {
    const V r = vload<V>(run + j) + (lane + T(j) < row ? lg_v : V{});
    vstore(run + j, r);
    use(j, vexp2(r));
  }
}

// State rows [K x vp] (padded) <-> the caller's [N, H, K, V] state tensors.
template <class T>
void load_scan_state(const LinearScanProblem& p, int vp, T* S, const void* src, int64_t n,
                     int64_t h) {
  const int64_t K = p.key_dim, Vd = p.value_dim;
  for (int64_t d = 0; d < K; ++d)
    for (int e = 0; e < vp; ++e)
      S[d * vp + e] =
          (src && e < Vd) ? static_cast<const T*>(src)[((n * p.heads + h) * K + d) * Vd + e] : T(0);
}

template <class T>
void store_scan_state(const LinearScanProblem& p, int vp, const T* S, void* dst, int64_t n,
                      int64_t h) {
  const int64_t K = p.key_dim, Vd = p.value_dim;
  for (int64_t d = 0; d < K; ++d)
    for (int64_t e = 0; e < Vd; ++e)
      static_cast<T*>(dst)[((n * p.heads + h) * K + d) * Vd + e] = S[d * vp + e];
}

template <class In, class T, DecayKind kDecay>
struct ScanEngine : ScanShape<T> {
  using V = typename Simd<T>::V;
  using ScanShape<T>::W;
  using ScanShape<T>::kChunk;
  using ScanShape<T>::K;
  using ScanShape<T>::Vd;
  using ScanShape<T>::kp;
  using ScanShape<T>::vp;
  using ScanShape<T>::cp;
  using ScanShape<T>::scale;
  static constexpr T kLog2e = T(1.4426950408889634);

  const LinearScanProblem& p;

  explicit ScanEngine(const LinearScanProblem& prob) : ScanShape<T>(prob), p(prob) {}

  // Chunk buffers: rows of q (scaled), k, v; their transposes kt [kp x cp] and
  // (backward) vt [vp x cp]; lg the per-token log2 decay per key; qfac = 2^P,
  // kfac = 2^E; qg = q qfac, kd = k kfac; A the intra scores; run the running
  // pairwise sums D (in log2 units) of the row being computed.
  struct Work {
    Buffer<T> q, k, v, kt, vt, lg, run, qfac, kfac, qg, kd, A, o, S, decay_row;
    Buffer<T> St, dO, dA, dq, dk, dv, dS, dSt, states;
  };

  void init(Work& w, bool backward, int64_t max_chunks) const {
    const int C = kChunk;
    for (Buffer<T>* b : {&w.q, &w.k, &w.lg, &w.qfac, &w.kfac, &w.qg, &w.kd})
      b->assign(size_t(C) * kp, T(0));
    w.v.assign(size_t(C) * vp, T(0));
    w.o.assign(size_t(C) * vp, T(0));
    w.kt.assign(size_t(kp) * cp, T(0));
    w.run.assign(size_t(kp) * cp, T(0));  // >= C * kp too (cp >= C)
    w.A.assign(size_t(C) * cp, T(0));
    w.S.assign(size_t(K) * vp, T(0));
    w.decay_row.assign(size_t(kp), T(0));
    if (backward) {
      w.vt.assign(size_t(vp) * cp, T(0));
      w.St.assign(size_t(Vd) * kp, T(0));
      w.dSt.assign(size_t(Vd) * kp, T(0));
      w.dO.assign(size_t(C) * vp, T(0));
      w.dA.assign(size_t(C) * cp, T(0));
      w.dq.assign(size_t(C) * kp, T(0));
      w.dk.assign(size_t(C) * kp, T(0));
      w.dv.assign(size_t(C) * vp, T(0));
      w.dS.assign(size_t(K) * vp, T(0));
      w.states.assign(size_t(max_chunks + 1) * K * vp, T(0));
    }
  }

  const In* row(const void* base, const int64_t* stride, int64_t b, int64_t t, int64_t h) const {
    return static_cast<const In*>(base) + b * stride[0] + t * stride[1] + h * stride[2];
  }

  // Loads tokens [t0, t0 + c) of (b, h) and derives every per-chunk factor.
  void load_chunk(Work& w, int64_t b, int64_t h, int64_t t0, int c) const {
    for (int i = 0; i < kChunk; ++i) {
      T* qr = w.q.data() + int64_t(i) * kp;
      T* kr = w.k.data() + int64_t(i) * kp;
      T* vr = w.v.data() + int64_t(i) * vp;
      fill(qr, qr + kp, T(0));
      fill(kr, kr + kp, T(0));
      fill(vr, vr + vp, T(0));
      if (i >= c) continue;
      const In* qs = row(p.q, p.q_stride, b, t0 + i, h);
      const In* ks = row(p.k, p.k_stride, b, t0 + i, h);
      const In* vs = row(p.v, p.v_stride, b, t0 + i, h);
      for (int d = 0; d < K; ++d) qr[d] = T(to_float(qs[d])) * scale;
      for (int d = 0; d < K; ++d) kr[d] = T(to_float(ks[d]));
      for (int d = 0; d < Vd; ++d) vr[d] = T(to_float(vs[d]));
    }
    for (int d = 0; d < kp; ++d)
      for (int j = 0; j < cp; ++j)
        w.kt[int64_t(d) * cp + j] = j < kChunk ? w.k[int64_t(j) * kp + d] : T(0);

    // Per-token log2 decays per key (scalar decays broadcast over the keys;
    // none, padded keys and tokens past the chunk are 0).
    for (int i = 0; i < kChunk; ++i) {
      T* lr = w.lg.data() + int64_t(i) * kp;
      fill(lr, lr + kp, T(0));
      if (kDecay == DecayKind::kNone || i >= c) continue;
      const int64_t at = (b * p.seq_len + t0 + i) * p.heads + h;
      if constexpr (kDecay == DecayKind::kScalar) {
        const T g = static_cast<const T*>(p.g)[at] * kLog2e;
        for (int d = 0; d < K; ++d) lr[d] = g;
      } else if constexpr (kDecay == DecayKind::kPerKey) {
        const T* gk = static_cast<const T*>(p.gk) + at * K;
        for (int d = 0; d < K; ++d) lr[d] = gk[d] * kLog2e;
      }
    }
    if constexpr (kDecay == DecayKind::kNone) {
      for (int64_t x = 0; x < int64_t(kChunk) * kp; ++x) {
        w.qfac[x] = T(1);
        w.kfac[x] = T(1);
        w.qg[x] = w.q[x];
        w.kd[x] = w.k[x];
      }
      for (int d = 0; d < kp; ++d) w.decay_row[d] = T(1);
    } else {
      // qfac = 2^{sum_{t<=i} lg_t} (a forward sum), kfac = 2^{sum_{t>j} lg_t} (a
      // backward sum), vectorized over keys. Tokens past the chunk get 0.
      // (tokenmix/scan_chunk_math.h, shared with the CUDA kernels)
      const auto exp2v = [](V x) { return vexp2(x); };
      for (int d = 0; d < kp; d += W) {
        const auto lg = [&](int i) { return vload<V>(w.lg.data() + int64_t(i) * kp + d); };
        const V total = chunk_prefix_decays<V>(
            kChunk, c, lg,
            [&](int i, V qf) {
              const int64_t x = int64_t(i) * kp + d;
              vstore(w.qfac.data() + x, qf);
              vstore(w.qg.data() + x, vload<V>(w.q.data() + x) * qf);
            },
            exp2v);
        vstore(w.decay_row.data() + d, total);
        chunk_suffix_decays<V>(
            kChunk, c, lg,
            [&](int j, V kf) {
              const int64_t x = int64_t(j) * kp + d;
              vstore(w.kfac.data() + x, kf);
              vstore(w.kd.data() + x, vload<V>(w.k.data() + x) * kf);
            },
            exp2v);
      }
      for (int d = K; d < kp; ++d) w.decay_row[d] = 0;
    }
  }

  // Applies the intra-chunk decay and causal mask to M[c x cp] in place:
  // M_ij *= 2^{D_ij} for j <= i, 0 otherwise (decay kinds without per-key
  // factors only; masked entries are assigned, never multiplied).
  void mask_decay(Work& w, T* M, int c) const {
    T* run = w.run.data();
    if constexpr (kDecay == DecayKind::kScalar) fill(run, run + cp, T(0));
    for (int i = 0; i < kChunk; ++i) {
      T* row = M + int64_t(i) * cp;
      if (i >= c) {
        fill(row, row + cp, T(0));
        continue;
      }
      if constexpr (kDecay == DecayKind::kScalar) {
        pairwise_decay_row(run, w.lg[int64_t(i) * kp], i,
                           [&](int j, V e) { vstore(row + j, vload<V>(row + j) * e); });
      }
      for (int j = i + 1; j < cp; ++j) row[j] = 0;
    }
  }

  // A_ij = q_i . (k_j e^{D_ij}) for j <= i.
  void intra_scores(Work& w, int c) const {
    T* A = w.A.data();
    if constexpr (kDecay != DecayKind::kPerKey) {
      gemm<T>(kChunk, cp, K, StridedRows<const T>{w.q.data(), kp}, 1,
              StridedRows<const T>{w.kt.data(), cp}, StridedRows<T>{A, cp}, false);
      mask_decay(w, A, c);
    } else {
      // Per-key factors stay inside the sum: vectorize over keys j instead,
      // with one running pairwise sum per key (run [kp x cp]).
      fill(w.A.begin(), w.A.end(), T(0));
      fill(w.run.begin(), w.run.end(), T(0));
      for (int i = 0; i < c; ++i) {
        T* Ai = A + int64_t(i) * cp;
        for (int d = 0; d < K; ++d) {
          const V qd = vbroadcast<V>(w.q[int64_t(i) * kp + d]);
          const T lg_id = w.lg[int64_t(i) * kp + d];
          const T* kt = w.kt.data() + int64_t(d) * cp;
          pairwise_decay_row(w.run.data() + int64_t(d) * cp, lg_id, i, [&](int j, V e) {
            vstore(Ai + j, vload<V>(Ai + j) + qd * vload<V>(kt + j) * e);
          });
        }
        for (int j = i + 1; j < cp; ++j) Ai[j] = 0;
      }
    }
  }

  void load_state(T* S, const void* src, int64_t n, int64_t h) const {
    load_scan_state(p, vp, S, src, n, h);
  }
  void store_state(const T* S, void* dst, int64_t n, int64_t h) const {
    store_scan_state(p, vp, S, dst, n, h);
  }

  // S = 2^{P_last} S + kd^T v
  void advance_state(Work& w, T* S, int c) const {
    for (int d = 0; d < K; ++d) {
      const T f = w.decay_row[d];
      for (int e = 0; e < vp; ++e) S[int64_t(d) * vp + e] *= f;
    }
    gemm<T>(K, vp, c, StridedRows<const T>{w.kd.data(), 1}, kp,
            StridedRows<const T>{w.v.data(), vp}, StridedRows<T>{S, vp}, true);
  }

  // ---- forward ----
  void forward_task(Work& w, int64_t n, int64_t h) const {
    int64_t b, begin, end;
    p.sequence(n, &b, &begin, &end);
    T* S = w.S.data();
    load_state(S, p.initial_state, n, h);
    In* out = static_cast<In*>(p.out);
    for (int64_t t0 = begin; t0 < end; t0 += kChunk) {
      const int c = int(min_of<int64_t>(kChunk, end - t0));
      load_chunk(w, b, h, t0, c);
      intra_scores(w, c);
      // o = qg S + A v
      T* o = w.o.data();
      gemm<T>(c, vp, K, StridedRows<const T>{w.qg.data(), kp}, 1, StridedRows<const T>{S, vp},
              StridedRows<T>{o, vp}, false);
      triangular_gemm<T>(Triangle::kLower, c, vp, c, StridedRows<const T>{w.A.data(), cp}, 1,
                         StridedRows<const T>{w.v.data(), vp}, StridedRows<T>{o, vp}, true);
      for (int i = 0; i < c; ++i) {
        In* dst = out + ((b * p.seq_len + t0 + i) * p.heads + h) * Vd;
        for (int e = 0; e < Vd; ++e) dst[e] = from_float<In>(o[int64_t(i) * vp + e]);
      }
      advance_state(w, S, c);
    }
    if (p.final_state) store_state(S, p.final_state, n, h);
  }

  // ---- backward ----
  void backward_task(Work& w, int64_t n, int64_t h) const {
    int64_t b, begin, end;
    p.sequence(n, &b, &begin, &end);
    const int64_t chunks = (end - begin + kChunk - 1) / kChunk;
    const int64_t ssize = int64_t(K) * vp;
    // 1. Chunk-start states (states[i] = state before chunk i; states[chunks] = final).
    T* S = w.states.data();
    load_state(S, p.initial_state, n, h);
    for (int64_t ci = 0; ci < chunks; ++ci) {
      const int64_t t0 = begin + ci * kChunk;
      const int c = int(min_of<int64_t>(kChunk, end - t0));
      T* next = w.states.data() + (ci + 1) * ssize;
      for (int64_t x = 0; x < ssize; ++x) next[x] = w.states[size_t(ci * ssize + x)];
      load_chunk(w, b, h, t0, c);
      advance_state(w, next, c);
    }
    // 2. dS = dL/dS_final; the final state contributes sum_v dS * S to dL/dG
    //    at the last token.
    T* dS = w.dS.data();
    load_state(dS, p.grad_final_state, n, h);
    const T* S_final = w.states.data() + chunks * ssize;
    T* dgk = static_cast<T*>(p.grad_gk);
    T* dg = static_cast<T*>(p.grad_g);
    const bool need_dG = kDecay != DecayKind::kNone;
    auto dG_at = [&](int64_t t, int d) -> T& {
      if constexpr (kDecay == DecayKind::kPerKey)
        return dgk[((b * p.seq_len + t) * p.heads + h) * K + d];
      return dg[(b * p.seq_len + t) * p.heads + h];
    };
    if (need_dG && end > begin) {
      for (int d = 0; d < K; ++d) dG_at(end - 1, d) = 0;
      for (int d = 0; d < K; ++d) {
        T acc = 0;
        for (int e = 0; e < Vd; ++e) acc += dS[int64_t(d) * vp + e] * S_final[int64_t(d) * vp + e];
        dG_at(end - 1, d) += acc;
      }
    }
    In* gq = static_cast<In*>(p.grad_q);
    In* gk_out = static_cast<In*>(p.grad_k);
    In* gv = static_cast<In*>(p.grad_v);
    // 3. Reverse over chunks.
    for (int64_t ci = chunks - 1; ci >= 0; --ci) {
      const int64_t t0 = begin + ci * kChunk;
      const int c = int(min_of<int64_t>(kChunk, end - t0));
      const T* Sp = w.states.data() + ci * ssize;
      load_chunk(w, b, h, t0, c);
      intra_scores(w, c);
      // v^T is needed by the backward only (dA = dO v^T).
      for (int e = 0; e < vp; ++e)
        for (int j = 0; j < cp; ++j)
          w.vt[int64_t(e) * cp + j] = j < kChunk ? w.v[int64_t(j) * vp + e] : T(0);
      T* dO = w.dO.data();
      const In* go = static_cast<const In*>(p.grad_out);
      for (int i = 0; i < kChunk; ++i) {
        T* r = dO + int64_t(i) * vp;
        fill(r, r + vp, T(0));
        if (i >= c) continue;
        const In* src = go + ((b * p.seq_len + t0 + i) * p.heads + h) * Vd;
        for (int e = 0; e < Vd; ++e) r[e] = T(to_float(src[e]));
      }
      // Transposes of the state and of its gradient ([Vd x kp]).
      for (int e = 0; e < Vd; ++e)
        for (int d = 0; d < kp; ++d) {
          w.St[int64_t(e) * kp + d] = d < K ? Sp[int64_t(d) * vp + e] : T(0);
          w.dSt[int64_t(e) * kp + d] = d < K ? dS[int64_t(d) * vp + e] : T(0);
        }
      // dA = dO v^T (causal part only)
      T* dA = w.dA.data();
      gemm<T>(kChunk, cp, Vd, StridedRows<const T>{dO, vp}, 1,
              StridedRows<const T>{w.vt.data(), cp}, StridedRows<T>{dA, cp}, false);
      T* dq = w.dq.data();
      T* dk = w.dk.data();
      T* dv = w.dv.data();
      // Inter-chunk parts: dq = (dO S^T) 2^P, dk = (v dS^T) 2^E.
      gemm<T>(c, kp, Vd, StridedRows<const T>{dO, vp}, 1, StridedRows<const T>{w.St.data(), kp},
              StridedRows<T>{dq, kp}, false);
      gemm<T>(c, kp, Vd, StridedRows<const T>{w.v.data(), vp}, 1,
              StridedRows<const T>{w.dSt.data(), kp}, StridedRows<T>{dk, kp}, false);
      for (int64_t x = 0; x < int64_t(c) * kp; ++x) {
        dq[x] *= w.qfac[x];
        dk[x] *= w.kfac[x];
      }
      // Intra-chunk parts (dA is zero above the diagonal).
      if constexpr (kDecay != DecayKind::kPerKey) {
        mask_decay(w, dA, c);  // dA ∘ Γ, causal
        triangular_gemm<T>(Triangle::kLower, c, kp, c, StridedRows<const T>{dA, cp}, 1,
                           StridedRows<const T>{w.k.data(), kp}, StridedRows<T>{dq, kp}, true);
        triangular_gemm<T>(Triangle::kUpper, c, kp, c, StridedRows<const T>{dA, 1}, cp,
                           StridedRows<const T>{w.q.data(), kp}, StridedRows<T>{dk, kp}, true);
      } else {
        // Per row i and block of keys, j runs down from i: D_ij = D_i(j+1) +
        // lg_(j+1) is carried in a register, each a sum over its own range.
        for (int i = 0; i < c; ++i) {
          const T* qi = w.q.data() + int64_t(i) * kp;
          T* dqi = dq + int64_t(i) * kp;
          for (int d = 0; d < kp; d += W) {
            const V q_d = vload<V>(qi + d);
            V dq_d = vload<V>(dqi + d), log_decay{};
            for (int j = i; j >= 0; --j) {
              const V a = vbroadcast<V>(dA[int64_t(i) * cp + j]);
              const V e = vexp2(log_decay);  // 2^0 = 1 on the diagonal
              T* dkj = dk + int64_t(j) * kp + d;
              dq_d += a * vload<V>(w.k.data() + int64_t(j) * kp + d) * e;
              vstore(dkj, vload<V>(dkj) + a * q_d * e);
              log_decay += vload<V>(w.lg.data() + int64_t(j) * kp + d);
            }
            vstore(dqi + d, dq_d);
          }
        }
      }
      // dv = A^T dO + kd dS
      triangular_gemm<T>(Triangle::kUpper, c, vp, c, StridedRows<const T>{w.A.data(), 1}, cp,
                         StridedRows<const T>{dO, vp}, StridedRows<T>{dv, vp}, false);
      gemm<T>(c, vp, K, StridedRows<const T>{w.kd.data(), kp}, 1, StridedRows<const T>{dS, vp},
              StridedRows<T>{dv, vp}, true);
      // dS_prev = 2^{P_last} dS + qg^T dO
      for (int d = 0; d < K; ++d) {
        const T f = w.decay_row[d];
        for (int e = 0; e < vp; ++e) dS[int64_t(d) * vp + e] *= f;
      }
      gemm<T>(K, vp, c, StridedRows<const T>{w.qg.data(), 1}, kp, StridedRows<const T>{dO, vp},
              StridedRows<T>{dS, vp}, true);
      // Store, and dL/dG_i = q_i dq_i - k_i dk_i (q, dq in scaled units).
      for (int i = 0; i < c; ++i) {
        const int64_t t = t0 + i;
        In* a = gq + ((b * p.seq_len + t) * p.heads + h) * K;
        In* bk = gk_out + ((b * p.seq_len + t) * p.heads + h) * K;
        In* cv = gv + ((b * p.seq_len + t) * p.heads + h) * Vd;
        for (int d = 0; d < K; ++d) a[d] = from_float<In>(dq[int64_t(i) * kp + d] * scale);
        for (int d = 0; d < K; ++d) bk[d] = from_float<In>(dk[int64_t(i) * kp + d]);
        for (int e = 0; e < Vd; ++e) cv[e] = from_float<In>(dv[int64_t(i) * vp + e]);
        if (need_dG) {
          if (t != end - 1)
            for (int d = 0; d < K; ++d) dG_at(t, d) = 0;
          for (int d = 0; d < K; ++d)
            dG_at(t, d) += w.q[int64_t(i) * kp + d] * dq[int64_t(i) * kp + d] -
                           w.k[int64_t(i) * kp + d] * dk[int64_t(i) * kp + d];
        }
      }
    }
    if (p.grad_initial_state) store_state(dS, p.grad_initial_state, n, h);
    // 4. dg_t = sum_{i >= t} dL/dG_i within the sequence.
    if (need_dG) {
      const int width = kDecay == DecayKind::kPerKey ? K : 1;
      for (int d = 0; d < width; ++d) {
        T acc = 0;
        for (int64_t t = end - 1; t >= begin; --t) {
          acc += dG_at(t, d);
          dG_at(t, d) = acc;
        }
      }
    }
  }
};

template <class In, class T, DecayKind kDecay>
void linear_scan_forward_impl(const LinearScanProblem& p) {
  const ScanEngine<In, T, kDecay> eng(p);
  run_parallel(p, p.num_seqs * p.heads, 1, [&](int64_t begin, int64_t end) {
    typename ScanEngine<In, T, kDecay>::Work w;
    eng.init(w, false, 0);
    for (int64_t t = begin; t < end; ++t) eng.forward_task(w, t / p.heads, t % p.heads);
  });
}

template <class In, class T, DecayKind kDecay>
void linear_scan_backward_impl(const LinearScanProblem& p) {
  const ScanEngine<In, T, kDecay> eng(p);
  const int64_t max_chunks = longest_sequence_chunks(p, eng.kChunk);
  run_parallel(p, p.num_seqs * p.heads, 1, [&](int64_t begin, int64_t end) {
    typename ScanEngine<In, T, kDecay>::Work w;
    eng.init(w, true, max_chunks);
    for (int64_t t = begin; t < end; ++t) eng.backward_task(w, t / p.heads, t % p.heads);
  });
}

template <class In, class T>
void linear_scan_dispatch(const LinearScanProblem& p, bool backward) {
  switch (p.decay) {
    case DecayKind::kNone:
      return backward ? linear_scan_backward_impl<In, T, DecayKind::kNone>(p)
                      : linear_scan_forward_impl<In, T, DecayKind::kNone>(p);
    case DecayKind::kScalar:
      return backward ? linear_scan_backward_impl<In, T, DecayKind::kScalar>(p)
                      : linear_scan_forward_impl<In, T, DecayKind::kScalar>(p);
    case DecayKind::kPerKey:
      return backward ? linear_scan_backward_impl<In, T, DecayKind::kPerKey>(p)
                      : linear_scan_forward_impl<In, T, DecayKind::kPerKey>(p);
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
