// Discrete Fourier transforms of any length along one axis of a tensor ("lines"), on the SIMT
// layer: the building block of fourier_mix, global_filter and spectral_gate on CUDA
// (fft_mix_kernels.h). float32 storage in shared memory.
//
// A block holds G = kFftConvCudaBlockSize / m lines side by side in shared memory, m being the
// in-block power-of-two transform length (LinePlan), transformed by fft_transform.h's plans:
// radix-2 Stockham on FMAs for float32 inputs, Monarch on tensor cores for fp16/bf16 inputs
// from m = 128 (one power-of-two normalization for the block's G lines together):
// - n a power of two: m = n, reordered to natural order around a Monarch plan;
// - any other n: Bluestein's algorithm. With the chirp c[t] = e^{i pi t^2 / n},
//   X[f] = conj c[f] * sum_t (x[t] conj c[t]) c[f - t], a circular convolution of length
//   m >= 2n - 1 computed with two m-point transforms and the chirp's spectrum, which each block
//   computes once. t^2 is reduced modulo 2n in integers before the conversion to float, so the
//   argument of sincospi stays below 2 (rounded once) however large t^2 grows.
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
// (data and work), then, for Bluestein, the chirp's spectrum (m points).
TM_HOST_DEVICE int64_t fft_line_smem_bytes(const LinePlan& q) {
  return fft_smem_bytes(q.m, 2, q.group * q.m) +
         (q.bluestein() ? q.m * int64_t(sizeof(Complex)) : 0);
}

struct LineSmem {
  FftConvSmem s;
  LinePlan q;
  FftPlan plan;                   // the in-block m-point transform: radix-2, or Monarch
  shared_ptr<Complex> chirp_hat;  // [m] the Bluestein chirp's spectrum, in the plan's order
};

// c[t] = e^{i pi t^2 / n}.
TM_DEVICE Complex chirp(int64_t n, int64_t t) {
  const int64_t r = (t * t) % (2 * n);
  float sn, cs;
  sincospi_f32(float(r) / float(n), &sn, &cs);
  return Complex{cs, sn};
}

// The block's twiddles and, for Bluestein, the chirp's spectrum over m (float32 radix-2, then
// put in the plan's order), times 1 / (m sigma^2): the inverse transform's normalization and
// the plan's scale of the forward and inverse transforms around the product.
TM_DEVICE LineSmem line_block_setup(const LinePlan& q, bool tensor_cores) {
  LineSmem l;
  l.q = q;
  l.s = fft_block_smem(q.m, q.group * q.m);
  l.plan = fft_plan(q.m, q.log2m, tensor_cores);
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
    if (r == l.chirp_hat) {  // the reordering below reads and writes different buffers
      for (int64_t j = thread_idx().x; j < q.m; j += block_dim().x) l.s.buf(0)[j] = r[j];
      sync_threads();
      r = l.s.buf(0);
    }
    const float scale = 1.0f / (float(q.m) * l.plan.sigma * l.plan.sigma);
    for (int64_t j = thread_idx().x; j < q.m; j += block_dim().x)
      l.chirp_hat[l.plan.position_of(j)] = cplx_scale(r[j], scale);
    sync_threads();
  }
  return l;
}

// The plan's m-point transforms of the G lines of `data`, in natural order in and out and
// unnormalized whatever the plan: a Monarch plan's spectra are reordered from (forward) or into
// (inverse) its digit-reversed order, and its scale sigma is undone. Returns the buffer holding
// the results; the other one is clobbered.
template <bool kInverse>
TM_DEVICE shared_ptr<Complex> natural_transform(const LineSmem& l, shared_ptr<Complex> data,
                                                shared_ptr<Complex> work) {
  const FftPlan& q = l.plan;
  const int64_t points = l.q.group * l.q.m, mask = l.q.m - 1;
  if (!q.monarch()) return stockham_radix2<kInverse>(l.s, q.n, q.log2n, data, work, l.q.group);
  const float unscale = 1.0f / q.sigma;
  if (kInverse) {
    for (int64_t i = thread_idx().x; i < points; i += block_dim().x)
      work[(i & ~mask) + q.position_of(i & mask)] = cplx_scale(data[i], unscale);
    sync_threads();
    transform<true>(l.s, q, work, data, l.q.group);
    return work;
  }
  transform<false>(l.s, q, data, work, l.q.group);
  for (int64_t i = thread_idx().x; i < points; i += block_dim().x)
    work[i] = cplx_scale(data[(i & ~mask) + q.position_of(i & mask)], unscale);
  sync_threads();
  return work;
}

// The unnormalized DFTs (forward e^{-2 pi i ft/n}, inverse e^{+}) of the G lines in `data` (line
// g at g * m, points 0 .. n - 1; beyond n: anything); `work` is clobbered. Returns the buffer
// holding the results (line g at g * m, frequencies 0 .. n - 1).
template <bool kInverse>
TM_DEVICE shared_ptr<Complex> line_dft(const LineSmem& l, shared_ptr<Complex> data,
                                       shared_ptr<Complex> work) {
  const LinePlan& q = l.q;
  const int64_t points = q.group * q.m, mask = q.m - 1;
  if (!q.bluestein()) return natural_transform<kInverse>(l, data, work);
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
  // The convolution with the chirp: the product of spectra in the plan's order (chirp_hat is
  // kept in it), and the inverse back to natural order.
  shared_ptr<Complex> r = transform<false>(l.s, l.plan, data, work, q.group);
  for (int64_t i = thread_idx().x; i < points; i += block_dim().x)
    r[i] = cplx_mul(r[i], l.chirp_hat[i & mask]);
  sync_threads();
  shared_ptr<Complex> other = r == data ? work : data;
  r = transform<true>(l.s, l.plan, r, other, q.group);
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
