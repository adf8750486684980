// Register-blocked C (+)= A * B for the small, cache-resident tiles of the
// attention engine. A is row-major [M x K]; B is row-major [K x N] with N a
// multiple of the vector width (callers pad their buffers); C is [M x N].
#pragma once

#include "tokenmix/cpu/simd.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

#if TOKENMIX_VEC_BYTES >= 64
constexpr int kGemmRows = 6;  // 6 x 4 accumulators + 4 B vectors + 1 broadcast: 29 of 32 zmm
constexpr int kGemmVecs = 4;
#elif TOKENMIX_VEC_BYTES >= 32
constexpr int kGemmRows = 6;  // 6 x 2 + 2 + 1 = 15 of 16 ymm
constexpr int kGemmVecs = 2;
#else
constexpr int kGemmRows = 4;
constexpr int kGemmVecs = 2;
#endif

template <class T, int MR, int NV>
inline void gemm_tile(int K, const T* __restrict A, int lda, const T* __restrict B, int ldb,
                      T* __restrict C, int ldc, bool accumulate) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::kWidth;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int p = 0; p < K; ++p) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload<V>(B + int64_t(p) * ldb + v * W);
    for (int r = 0; r < MR; ++r) {
      const V a = vbroadcast<V>(A[int64_t(r) * lda + p]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      T* c = C + int64_t(r) * ldc + v * W;
      if (accumulate) acc[r][v] += vload<V>(c);
      vstore(c, acc[r][v]);
    }
}

template <class T, int NV>
inline void gemm_rows(int rows, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc,
                      bool accumulate) {
  int i = 0;
  for (; i + kGemmRows <= rows; i += kGemmRows)
    gemm_tile<T, kGemmRows, NV>(K, A + int64_t(i) * lda, lda, B, ldb, C + int64_t(i) * ldc, ldc,
                                accumulate);
  const T* a = A + int64_t(i) * lda;
  T* c = C + int64_t(i) * ldc;
  switch (rows - i) {
    case 1: gemm_tile<T, 1, NV>(K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_tile<T, 2, NV>(K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 3: gemm_tile<T, 3, NV>(K, a, lda, B, ldb, c, ldc, accumulate); break;
#if TOKENMIX_VEC_BYTES >= 32
    case 4: gemm_tile<T, 4, NV>(K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 5: gemm_tile<T, 5, NV>(K, a, lda, B, ldb, c, ldc, accumulate); break;
#endif
    default: break;
  }
}

// C[M x N] (+)= A[M x K] * B[K x N]; N % vector width == 0.
template <class T>
inline void gemm(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc,
                 bool accumulate) {
  constexpr int W = Simd<T>::kWidth;
  int j = 0;
  for (; j + kGemmVecs * W <= N; j += kGemmVecs * W)
    gemm_rows<T, kGemmVecs>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
  const int rest = (N - j) / W;
  if (rest == 1) gemm_rows<T, 1>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
#if TOKENMIX_VEC_BYTES >= 64
  if (rest == 2) gemm_rows<T, 2>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
  if (rest == 3) gemm_rows<T, 3>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
#endif
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
