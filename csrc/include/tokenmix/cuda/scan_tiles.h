// Shared-memory matrices and warp-level products of the CUDA scans (linear_scan_kernels.h).
//
// Every product leaves its result in the accumulator layout of mma.sync (simt/layouts.h): a warp
// owns a 16 x 8 NT tile and lane (g = lane / 4, q = lane % 4) holds acc[n][i], the element at row
// g + 8 (i / 2), column 8 n + 2 q + i % 2. fp16/bf16 inputs run the products on tensor cores as
// mma.sync m16n8k8 with tf32 operands: the operands are float32 values the kernels computed
// (decay-scaled q and k, masked scores, the float32 state), so tf32 keeps their range, and its
// 10-bit mantissa holds every fp16/bf16 input exactly. float32 inputs use FMAs in the same layout,
// so the kernels are written once.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/warp_gemm.h"

namespace tokenmix::cuda {

// A row-major float matrix in shared memory, rows of `ld` floats. With kSwizzle, column c of row
// r is stored at c ^ 4 (r % 8) (ld a multiple of 32): the tf32 fragment reads (rows g, columns
// k + q) fall into 32 distinct banks, the transposed ones (rows k + q, columns g) into at most
// 2-way conflicts, at the size of the plain layout.
template <bool kSwizzle>
struct SmemMat {
  shared_ptr<float> base;
  int ld;
  TM_DEVICE int index(int r, int c) const { return r * ld + (kSwizzle ? c ^ ((r & 7) << 2) : c); }
  TM_DEVICE float operator()(int r, int c) const { return float(base[index(r, c)]); }
  TM_DEVICE void set(int r, int c, float v) const { base[index(r, c)] = v; }
};
using ScanMat = SmemMat<true>;

// A block's dynamic shared memory handed out in order: swizzled matrices and plain arrays.
struct SmemCarver {
  shared_ptr<float> at;
  TM_DEVICE SmemCarver() : at(dynamic_shared<float>()) {}
  TM_DEVICE ScanMat matrix(int64_t rows, int ld) {
    const ScanMat m{at, ld};
    at = at + rows * ld;
    return m;
  }
  TM_DEVICE shared_ptr<float> array(int64_t n) {
    const shared_ptr<float> a = at;
    at = at + n;
    return a;
  }
};

struct FragLane {
  int g, q;
};
TM_DEVICE FragLane frag_lane() {
  const int l = int(lane_id());
  return {l >> 2, l & 3};
}
TM_DEVICE int frag_row(FragLane f, int i) {
  return f.g + 8 * (i >> 1);
}
TM_DEVICE int frag_col(FragLane f, int n, int i) {
  return 8 * n + 2 * f.q + (i & 1);
}

// acc += sum_{k0 <= k < k1} a(r, k) b(k, n) over the warp's tile (r < 16, n < 8 NT). The tensor
// path steps k by 8 (k0 and k1 multiples of 8); warp-uniform bounds.
template <bool kTensor, int NT, class AFn, class BFn>
TM_DEVICE void warp_product(float (&acc)[NT][4], int k0, int k1, AFn a, BFn b) {
  const FragLane f = frag_lane();
  if constexpr (kTensor) {
    for (int k = k0; k < k1; k += 8) {
      const uint32_t af[4] = {
          f32_to_tf32_bits(a(f.g, k + f.q)), f32_to_tf32_bits(a(f.g + 8, k + f.q)),
          f32_to_tf32_bits(a(f.g, k + f.q + 4)), f32_to_tf32_bits(a(f.g + 8, k + f.q + 4))};
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const uint32_t bf[2] = {f32_to_tf32_bits(b(k + f.q, 8 * n + f.g)),
                                f32_to_tf32_bits(b(k + f.q + 4, 8 * n + f.g))};
        mma_m16n8k8_tf32f32(acc[n], af, bf, acc[n]);
      }
    }
  } else {
    for (int k = k0; k < k1; ++k) {
      const float a0 = a(f.g, k), a1 = a(f.g + 8, k);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const float b0 = b(k, 8 * n + 2 * f.q), b1 = b(k, 8 * n + 2 * f.q + 1);
        acc[n][0] += a0 * b0;
        acc[n][1] += a0 * b1;
        acc[n][2] += a1 * b0;
        acc[n][3] += a1 * b1;
      }
    }
  }
}

// The same product over the pairs keep(r, k) admits, in float32 FMAs for every type: the part of
// a causal product next to the diagonal, where a masked entry must not be multiplied at all
// (0 * inf is NaN, and an inf or NaN at a later token must not reach an earlier row).
template <int NT, class AFn, class BFn, class KeepFn>
TM_DEVICE void warp_product_kept(float (&acc)[NT][4], int k0, int k1, AFn a, BFn b, KeepFn keep) {
  const FragLane f = frag_lane();
  for (int k = k0; k < k1; ++k)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = f.g + 8 * h;
      if (!keep(r, k)) continue;
      const float ar = a(r, k);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[n][2 * h] += ar * b(k, 8 * n + 2 * f.q);
        acc[n][2 * h + 1] += ar * b(k, 8 * n + 2 * f.q + 1);
      }
    }
}

// The token range of a product over the chunk's c tokens: c, rounded up to the tensor path's
// 8-token steps (the operands' rows past c are 0 in shared memory).
template <bool kTensor>
TM_DEVICE int scan_token_end(int c) {
  return kTensor ? (c + 7) / 8 * 8 : c;
}

// Causal products over the warp's rows m0 + r and tokens k < c: `lower` sums k <= m0 + r, `upper`
// sums k >= m0 + r. The blocks off the diagonal run warp_product (every pair kept), the warp's
// 16-token diagonal block warp_product_kept. Operands past c must be 0 (finite) in shared memory.
template <bool kTensor, int NT, class AFn, class BFn>
TM_DEVICE void warp_product_lower(float (&acc)[NT][4], int m0, int c, AFn a, BFn b) {
  if (m0 >= c) return;
  warp_product<kTensor, NT>(acc, 0, m0, a, b);
  warp_product_kept<NT>(acc, m0, m0 + 16 < c ? m0 + 16 : c, a, b,
                        [&](int r, int k) { return k <= m0 + r; });
}
template <bool kTensor, int NT, class AFn, class BFn>
TM_DEVICE void warp_product_upper(float (&acc)[NT][4], int m0, int c, AFn a, BFn b) {
  if (m0 >= c) return;
  warp_product_kept<NT>(acc, m0, m0 + 16 < c ? m0 + 16 : c, a, b,
                        [&](int r, int k) { return k >= m0 + r; });
  const int end = scan_token_end<kTensor>(c);
  if (m0 + 16 < end) warp_product<kTensor, NT>(acc, m0 + 16, end, a, b);
}

// The warp's tile at (m0, n0) of a shared-memory matrix, stored or read.
template <int NT, bool kSw>
TM_DEVICE void frag_store(const float (&acc)[NT][4], SmemMat<kSw> dst, int m0, int n0) {
  const FragLane f = frag_lane();
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) dst.set(m0 + frag_row(f, i), n0 + frag_col(f, n, i), acc[n][i]);
}
template <int NT, bool kSw>
TM_DEVICE void frag_load(float (&acc)[NT][4], SmemMat<kSw> src, int m0, int n0) {
  const FragLane f = frag_lane();
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = src(m0 + frag_row(f, i), n0 + frag_col(f, n, i));
}

}  // namespace tokenmix::cuda
