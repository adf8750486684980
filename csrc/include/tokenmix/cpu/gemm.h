// Register-blocked C (+)= A * B for the small, cache-resident tiles of the
// attention engine.
//
// The operands are addressed through row accessors so the engine multiplies
// key/value rows where they already are (no packing):
//   A[i][p] = a.row(i)[p * a_step]   (a_step > 1 reads A transposed)
//   B[p][j] = b.row(p)[j]            (rows must hold N elements, N % W == 0)
//   C[i][j] = c.row(i)[j]
#pragma once

#include "tokenmix/cpu/simd.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

template <class T>
struct StridedRows {
  T* base;
  int64_t ld;
  T* row(int64_t i) const { return base + i * ld; }
};

template <class T>
struct TableRows {
  T* const* rows;
  T* row(int64_t i) const { return rows[i]; }
};

// Largest row block for NV accumulator vectors per row (register budget).
#if TOKENMIX_VEC_BYTES >= 64
constexpr int kMaxVecs = 4;
template <int NV>
constexpr int kBlockRows = NV == 1 ? 12 : (NV == 2 ? 8 : 6);
#else
constexpr int kMaxVecs = 2;
template <int NV>
constexpr int kBlockRows = NV == 1 ? 8 : 6;
#endif

template <class T, int MR, int NV, class A, class B, class C>
inline void gemm_tile(int K, const A& a, int a_step, int64_t i0, const B& b, int j0, const C& c,
                      bool accumulate) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::kWidth;
  const T* ap[MR];
  for (int r = 0; r < MR; ++r) ap[r] = a.row(i0 + r);
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int p = 0; p < K; ++p) {
    const T* brow = b.row(p) + j0;
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(brow + v * W);
    const int64_t ao = int64_t(p) * a_step;
    for (int r = 0; r < MR; ++r) {
      const V av = vbroadcast<V>(ap[r][ao]);
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    T* crow = c.row(i0 + r) + j0;
    for (int v = 0; v < NV; ++v) {
      V x = acc[r][v];
      if (accumulate) x += vload<V>(crow + v * W);
      vstore(crow + v * W, x);
    }
  }
}

template <class T, int NV, class A, class B, class C>
inline void gemm_rows(int M, int K, const A& a, int a_step, const B& b, int j0, const C& c,
                      bool accumulate) {
  constexpr int MR = kBlockRows<NV>;
  int i = 0;
  for (; i + MR <= M; i += MR) gemm_tile<T, MR, NV>(K, a, a_step, i, b, j0, c, accumulate);
  // Tails in power-of-two blocks keep the number of instantiations small.
  if (M - i >= 4) {
    gemm_tile<T, 4, NV>(K, a, a_step, i, b, j0, c, accumulate);
    i += 4;
  }
  if (M - i >= 4) {
    gemm_tile<T, 4, NV>(K, a, a_step, i, b, j0, c, accumulate);
    i += 4;
  }
  if (M - i >= 2) {
    gemm_tile<T, 2, NV>(K, a, a_step, i, b, j0, c, accumulate);
    i += 2;
  }
  if (M - i >= 1) gemm_tile<T, 1, NV>(K, a, a_step, i, b, j0, c, accumulate);
}

// C[M x N] (+)= A[M x K] * B[K x N]; N must be a multiple of the vector width.
template <class T, class A, class B, class C>
inline void gemm(int M, int N, int K, const A& a, int a_step, const B& b, const C& c,
                 bool accumulate) {
  constexpr int W = Simd<T>::kWidth;
  int j = 0;
  for (; j + kMaxVecs * W <= N; j += kMaxVecs * W)
    gemm_rows<T, kMaxVecs>(M, K, a, a_step, b, j, c, accumulate);
  switch ((N - j) / W) {
    case 1: gemm_rows<T, 1>(M, K, a, a_step, b, j, c, accumulate); break;
#if TOKENMIX_VEC_BYTES >= 64
    case 2: gemm_rows<T, 2>(M, K, a, a_step, b, j, c, accumulate); break;
    case 3: gemm_rows<T, 3>(M, K, a, a_step, b, j, c, accumulate); break;
#endif
    default: break;
  }
}

// Whether rows [0, K) x columns [0, N) of b are all finite (N % W == 0):
// x * 0 is 0 for finite x and NaN for inf or NaN, so one vector sum of them
// says it without a branch per element.
template <class T, class B>
inline bool rows_finite(const B& b, int K, int N) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::kWidth;
  V acc{};
  for (int p = 0; p < K; ++p) {
    const T* row = b.row(p);
    for (int j = 0; j < N; j += W) acc += vload<V>(row + j) * T(0);
  }
  for (int l = 0; l < W; ++l)
    if (acc[l] != T(0)) return false;
  return true;
}

// C[M x N] (+)= A[M x K] * B[K x N] for a triangular A: lower (A[i][p] = 0 for
// p > i) or upper (A[i][p] = 0 for p < i). The plain gemm multiplies the zero
// triangle by every row of B, and 0 * inf is NaN: a non-finite row of B would
// reach rows of C that A does not connect it to. When B is not all finite the
// zero triangle is skipped instead (a row loop; the finite case pays one pass
// over B).
enum class Triangle { kLower, kUpper };

template <class T, class A, class B, class C>
inline void triangular_gemm(Triangle tri, int M, int N, int K, const A& a, int a_step, const B& b,
                            const C& c, bool accumulate) {
  if (rows_finite<T>(b, K, N)) return gemm<T>(M, N, K, a, a_step, b, c, accumulate);
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::kWidth;
  for (int i = 0; i < M; ++i) {
    T* crow = c.row(i);
    if (!accumulate)
      for (int j = 0; j < N; ++j) crow[j] = T(0);
    const int p0 = tri == Triangle::kUpper ? i : 0;
    const int p1 = tri == Triangle::kUpper ? K : (i + 1 < K ? i + 1 : K);
    for (int p = p0; p < p1; ++p) {
      const V av = vbroadcast<V>(a.row(i)[int64_t(p) * a_step]);
      const T* brow = b.row(p);
      for (int j = 0; j < N; j += W) vstore(crow + j, vload<V>(crow + j) + av * vload<V>(brow + j));
    }
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
