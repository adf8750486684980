// Discrete Fourier transforms of any length along one axis of a tensor ("lines"), on the SIMT
// layer: the building block of fourier_mix, global_filter and spectral_gate on CUDA
// (fft_mix_kernels.h). float32 storage and arithmetic (FMA) for every input dtype, as on the CPU.
//
// A block holds G = kFftConvCudaBlockSize / m lines side by side in shared memory, m being the
// in-block power-of-two transform length (LinePlan):
// - n a power of two: m = n, fft_transform.h's radix-2 Stockham transform;
// - any other n: Bluestein's algorithm. With the chirp c[t] = e^{i pi t^2 / n},
//   X[f] = conj c[f] * sum_t (x[t] conj c[t]) c[f - t], a circular convolution of length
//   m >= 2n - 1 computed with two m-point transforms and the chirp's spectrum, which each block
//   computes once. t^2 is reduced modulo 2n in integers, so the chirp's argument is exact.
// Inverse transforms are conj(DFT(conj x)). No normalization anywhere: callers scale.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/fft_transform.h"
#include "tokenmix/fft_problem.h"

namespace tokenmix::cuda {

using namespace ::tokenmix::simt;

struct LinePlan {
  int64_t n = 1;  // the DFT's length
  int64_t m = 1;  // the in-block transform length: n, or Bluestein's power of two >= 2n - 1
  int log2m = 0;
  int64_t group = 1;  // lines per block: kFftConvCudaBlockSize / m
  TM_HOST_DEVICE bool bluestein() const { return m != n; }
};

TM_HOST_DEVICE LinePlan line_plan(int64_t n) {
  LinePlan q;
  q.n = n;
  const bool pow2 = n >= 1 && (n & (n - 1)) == 0;
  const int64_t need = pow2 ? n : 2 * n - 1;
  while (q.m < need) {
    q.m *= 2;
    ++q.log2m;
  }
  q.group = q.m < kFftConvCudaBlockSize ? kFftConvCudaBlockSize / q.m : 1;
  return q;
}

// The shared memory of a line block: fft_transform.h's layout with two buffers of G * m points
// (data and work), then the chirp's spectrum (m points).
TM_HOST_DEVICE int64_t fft_line_smem_bytes(const LinePlan& q) {
  return fft_smem_bytes(q.m, 2, q.group * q.m) + q.m * int64_t(sizeof(Complex));
}

struct LineSmem {
  FftConvSmem s;
  LinePlan q;
  shared_ptr<Complex> chirp_hat;  // [m] the Bluestein chirp's spectrum over m
};

// c[t] = e^{i pi t^2 / n}.
TM_DEVICE Complex chirp(int64_t n, int64_t t) {
  const int64_t r = (t * t) % (2 * n);
  float sn, cs;
  sincospi_f32(float(r) / float(n), &sn, &cs);
  return Complex{cs, sn};
}

// The block's twiddles and, for Bluestein, the chirp's spectrum over m, scaled by 1/m (the
// inverse transform's normalization).
TM_DEVICE LineSmem line_block_setup(const LinePlan& q) {
  LineSmem l;
  l.q = q;
  l.s = fft_block_smem(q.m, q.group * q.m);
  l.chirp_hat = l.s.buf(2);
  fill_twiddles(l.s, q.m);
  if (q.bluestein()) {
    for (int64_t j = thread_idx().x; j < q.m; j += block_dim().x) {
      Complex v{0.0f, 0.0f};
      if (j < q.n) v = chirp(q.n, j);
      if (q.m - j < q.n) v = chirp(q.n, q.m - j);
      l.chirp_hat[j] = v;
    }
  }
  sync_threads();
  if (q.bluestein()) {
    shared_ptr<Complex> r = stockham_radix2<false>(l.s, q.m, q.log2m, l.chirp_hat, l.s.buf(0));
    const float inv_m = 1.0f / float(q.m);
    for (int64_t j = thread_idx().x; j < q.m; j += block_dim().x)
      l.chirp_hat[j] = cplx_scale(r[j], inv_m);
    sync_threads();
  }
  return l;
}

// The unnormalized DFTs (forward e^{-2 pi i ft/n}, inverse e^{+}) of the G lines in `data` (line
// g at g * m, points 0 .. n - 1; beyond n: anything); `work` is clobbered. Returns the buffer
// holding the results (line g at g * m, frequencies 0 .. n - 1).
template <bool kInverse>
TM_DEVICE shared_ptr<Complex> line_dft(const LineSmem& l, shared_ptr<Complex> data,
                                       shared_ptr<Complex> work) {
  const LinePlan& q = l.q;
  const int64_t points = q.group * q.m, mask = q.m - 1;
  if (!q.bluestein()) return stockham_radix2<kInverse>(l.s, q.m, q.log2m, data, work, q.group);
  for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
    const int64_t t = i & mask;
    Complex v{0.0f, 0.0f};
    if (t < q.n) {
      v = data[i];
      if (kInverse) v = cplx_conj(v);
      v = cplx_mul(v, cplx_conj(chirp(q.n, t)));
    }
    data[i] = v;
  }
  sync_threads();
  shared_ptr<Complex> r = stockham_radix2<false>(l.s, q.m, q.log2m, data, work, q.group);
  for (int64_t i = thread_idx().x; i < points; i += block_dim().x)
    r[i] = cplx_mul(r[i], l.chirp_hat[i & mask]);
  sync_threads();
  shared_ptr<Complex> other = r == data ? work : data;
  r = stockham_radix2<true>(l.s, q.m, q.log2m, r, other, q.group);
  for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
    const int64_t t = i & mask;
    if (t >= q.n) continue;
    Complex v = cplx_mul(r[i], cplx_conj(chirp(q.n, t)));
    r[i] = kInverse ? cplx_conj(v) : v;
  }
  sync_threads();
  return r;
}

// The buffer of a block's pair that is not `used`.
TM_DEVICE shared_ptr<Complex> other_buffer(const LineSmem& l, const shared_ptr<Complex>& used) {
  return used == l.s.buf(0) ? l.s.buf(1) : l.s.buf(0);
}

}  // namespace tokenmix::cuda
