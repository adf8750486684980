// fft_conv on CUDA, written on the SIMT layer (nvcc builds it for the GPU, the host compiler for
// the emulator). One block per pair of channels, the pair packed as one complex signal
// z = v_c0 + i v_c1, so one complex transform serves both channels; each block keeps the whole
// transform in shared memory (power-of-two lengths up to kFftConvCudaBlockSize; longer ones take
// fft_conv_multipass.h), float32 storage and arithmetic outside the transforms.
//
// The transforms (tokenmix/cuda/fft_transform.h) are radix-2 Stockham on FMAs for float32, and
// Monarch on tensor cores for fp16/bf16 (from 128 points), whose spectra are digit-reversed:
// every spectrum of a block (filter, signal, gradient) is kept in its plan's order, and the
// inverse transforms return natural order. Spectra of the two channels come out of the packed
// spectrum Z by symmetry:
//   X0[f] = (Z[f] + conj Z[-f]) / 2,  X1[f] = (Z[f] - conj Z[-f]) / (2i),
// and a pair of real results w0, w1 goes back through one inverse transform of W0 + i W1.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/fft_transform.h"
#include "tokenmix/cuda/launch_common.h"
#include "tokenmix/cuda/warp_gemm.h"
#include "tokenmix/fft_problem.h"
#include "tokenmix/simt/simt.h"

namespace tokenmix::cuda {

using namespace ::tokenmix::simt;

// One element of a tensor whose dtype is known only at run time (filters, biases).
TM_DEVICE float load_any(const global_ptr<const uint8_t>& base, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kFloat32: return ptr_cast<const float>(base)[index];
    case DType::kFloat16: return f16_bits_to_f32(ptr_cast<const uint16_t>(base)[index]);
    case DType::kBFloat16: return bf16_bits_to_f32(ptr_cast<const uint16_t>(base)[index]);
    default: return 0.0f;
  }
}
TM_DEVICE void store_any(const global_ptr<uint8_t>& base, DType dtype, int64_t index, float v) {
  switch (dtype) {
    case DType::kFloat32: ptr_cast<float>(base)[index] = v; return;
    case DType::kFloat16: ptr_cast<uint16_t>(base)[index] = f32_to_f16_bits(v); return;
    case DType::kBFloat16: ptr_cast<uint16_t>(base)[index] = f32_to_bf16_bits(v); return;
    default: return;
  }
}

// Plain-data kernel arguments (strides in elements).
struct FftConvParams {
  int64_t batch, length, channels, taps, n;
  int log2n;
  bool fold;  // a circular convolution computed as a linear one: y[t] += z[t + L], t < Lk - 1
  const void* u;
  int64_t u_stride[3];
  const void* pre;
  int64_t pre_stride[3];
  const void* post;
  int64_t post_stride[3];
  const void* dy;
  int64_t dy_stride[3];
  const void* k;
  int64_t k_stride[2];
  DType k_dtype;
  const void* bias;
  int64_t bias_stride;
  DType bias_dtype;
  void* out;        // contiguous [B, L, C]: y (forward) or du (backward)
  void* grad_pre;   // contiguous [B, L, C] or null
  void* grad_post;  // contiguous [B, L, C] or null
  void* grad_k;     // contiguous [C, Lk], k's dtype
  void* grad_bias;  // contiguous [C], bias's dtype, or null
  // Backward: the batch is split into `chunks` of `batch_per_chunk` entries (grid height); with
  // more than one, each chunk's dk and d_bias go to partial_k [chunks, C, Lk] and
  // partial_bias [chunks, C], which fft_conv_reduce_kernel adds in chunk order.
  int64_t chunks, batch_per_chunk;
  float* partial_k;
  float* partial_bias;
};

// The shared-memory bytes of a block with `buffers` complex buffers (fft_transform.h's layout).
// The backward's d_bias reduction reuses buffer 1 for two floats per thread, which short
// transforms would not cover.
TM_HOST_DEVICE int64_t fft_conv_smem_bytes(int64_t n, int buffers) {
  const int64_t layout = fft_smem_bytes(n, buffers);
  const int64_t reduction = fft_smem_bytes(n, 1) + 2 * kFftConvThreads * 4;
  return layout > reduction ? layout : reduction;
}

// Per-pair spectra of two real signals packed as z = x0 + i x1: (X0[f], X1[f]) from Z, for the
// frequency f at position `pos` of the plan's order (`partner` holds -f).
TM_DEVICE void unpack_pair(const shared_ptr<Complex>& z, int64_t pos, int64_t partner, Complex* x0,
                           Complex* x1) {
  const Complex a = z[pos];
  const Complex b = cplx_conj(z[partner]);
  x0->re = 0.5f * (a.re + b.re);
  x0->im = 0.5f * (a.im + b.im);
  // (a - b) / (2i) = (Im(a - b) - i Re(a - b)) / 2
  x1->re = 0.5f * (a.im - b.im);
  x1->im = -0.5f * (a.re - b.re);
}

// The packed spectrum of two real results whose spectra are w0 (at f) and w1: W0 + i W1 at f.
TM_DEVICE Complex pack_pair(Complex w0, Complex w1) {
  Complex r;
  r.re = w0.re - w1.im;
  r.im = w0.im + w1.re;
  return r;
}

// The pair's convolutions with the filter pair: W = K0 X0 + i K1 X1 into dst from the packed
// spectra x_hat and k_hat, then its inverse transform (work is clobbered; returns whichever of
// dst and work holds the result: w0 + i w1, normalized by the scale folded into k_hat).
TM_DEVICE shared_ptr<Complex> convolve_pair(const FftConvSmem& s, const FftPlan& q,
                                            const shared_ptr<Complex>& x_hat,
                                            const shared_ptr<Complex>& k_hat,
                                            shared_ptr<Complex> dst, shared_ptr<Complex> work) {
  for (int64_t f = thread_idx().x; f < q.n; f += block_dim().x) {
    const int64_t partner = q.partner(f);
    Complex x0, x1, k0, k1;
    unpack_pair(x_hat, f, partner, &x0, &x1);
    unpack_pair(k_hat, f, partner, &k0, &k1);
    dst[f] = pack_pair(cplx_mul(k0, x0), cplx_mul(k1, x1));
  }
  sync_threads();
  return transform<true>(s, q, dst, work);
}

// A [B, L, C] operand of element type E::T (u, gates, dy) at (b, t, c).
template <class E>
TM_DEVICE float load_token(const global_ptr<const typename E::T>& x, const int64_t* stride,
                           int64_t b, int64_t t, int64_t c) {
  return E::to_float(x[b * stride[0] + t * stride[1] + c * stride[2]]);
}

// The token a signal of n points holds at position t, or -1 for a zero: t < L, and with `wrap`
// (the folded convolution's gradient, which every output position t + L also receives)
// L <= t < L + Lk - 1.
TM_HOST_DEVICE int64_t signal_token(const FftConvParams& p, int64_t t, bool wrap) {
  if (t < p.length) return t;
  return wrap && t - p.length < p.taps - 1 ? t - p.length : -1;
}

// z[t] = (v_c0[t], v_c1[t]) for t < L (v = pre_gate * u or post_gate * dy), zero up to n (or
// wrapped, see signal_token).
template <class E>
TM_DEVICE void load_pair(const global_ptr<const typename E::T>& x, const int64_t* xs,
                         const global_ptr<const typename E::T>& gate, const int64_t* gs,
                         bool has_gate, const FftConvParams& p, int64_t b, int64_t c0,
                         shared_ptr<Complex> z, bool wrap = false) {
  const bool second = c0 + 1 < p.channels;
  for (int64_t i = thread_idx().x; i < p.n; i += block_dim().x) {
    Complex v;
    v.re = 0.0f;
    v.im = 0.0f;
    const int64_t t = signal_token(p, i, wrap);
    if (t >= 0) {
      v.re = load_token<E>(x, xs, b, t, c0);
      if (has_gate) v.re *= load_token<E>(gate, gs, b, t, c0);
      if (second) {
        v.im = load_token<E>(x, xs, b, t, c0 + 1);
        if (has_gate) v.im *= load_token<E>(gate, gs, b, t, c0 + 1);
      }
    }
    z[i] = v;
  }
}

// The filter pair's packed spectrum in the plan's order, times 1 / (n sigma^2): the inverse
// transform's normalization and the plan's scale of the signal's forward and inverse transforms.
// Computed by the float32 radix-2 transform whatever the plan (once per block, and the filter
// may be float32 while the signal is fp16/bf16).
template <class E>
TM_DEVICE void filter_spectrum(const FftConvParams& p, const FftConvSmem& s, const FftPlan& q,
                               int64_t c0, shared_ptr<Complex> k_hat, shared_ptr<Complex> work) {
  const global_ptr<const uint8_t> k(static_cast<const uint8_t*>(p.k));
  const bool second = c0 + 1 < p.channels;
  for (int64_t t = thread_idx().x; t < p.n; t += block_dim().x) {
    Complex v;
    v.re = 0.0f;
    v.im = 0.0f;
    if (t < p.taps) {
      v.re = load_any(k, p.k_dtype, c0 * p.k_stride[0] + t * p.k_stride[1]);
      if (second) v.im = load_any(k, p.k_dtype, (c0 + 1) * p.k_stride[0] + t * p.k_stride[1]);
    }
    k_hat[t] = v;
  }
  sync_threads();
  shared_ptr<Complex> r = stockham_radix2<false>(s, p.n, p.log2n, k_hat, work);
  if (r == k_hat) {  // the reordering below reads and writes different buffers
    for (int64_t f = thread_idx().x; f < p.n; f += block_dim().x) work[f] = k_hat[f];
    sync_threads();
    r = work;
  }
  const float scale = 1.0f / (float(p.n) * q.sigma * q.sigma);
  for (int64_t f = thread_idx().x; f < p.n; f += block_dim().x)
    k_hat[q.position_of(f)] = cplx_scale(r[f], scale);
  sync_threads();
}

// Output t of the pair's convolutions from the inverse transform y (natural order).
TM_DEVICE Complex convolution_at(const FftConvParams& p, const shared_ptr<Complex>& y, int64_t t) {
  const Complex v = y[t];
  return p.fold && t < p.taps - 1 ? cplx_add(v, y[t + p.length]) : v;
}

// One batch entry of the forward.
template <class E>
TM_DEVICE void fft_conv_forward_entry(const FftConvParams& p, const FftConvSmem& s,
                                      const FftPlan& q, int64_t b, int64_t c0,
                                      shared_ptr<Complex> k_hat, shared_ptr<Complex> z,
                                      shared_ptr<Complex> work) {
  using T = typename E::T;
  const global_ptr<const T> u(static_cast<const T*>(p.u));
  const global_ptr<const T> pre(static_cast<const T*>(p.pre));
  const global_ptr<const T> post(static_cast<const T*>(p.post));
  const global_ptr<const uint8_t> bias(static_cast<const uint8_t*>(p.bias));
  const global_ptr<T> out(static_cast<T*>(p.out));
  load_pair<E>(u, p.u_stride, pre, p.pre_stride, p.pre != nullptr, p, b, c0, z);
  sync_threads();
  shared_ptr<Complex> spec = transform<false>(s, q, z, work);
  shared_ptr<Complex> other = spec == z ? work : z;
  shared_ptr<Complex> y = convolve_pair(s, q, spec, k_hat, other, spec);
  const bool second = c0 + 1 < p.channels;
  for (int64_t t = thread_idx().x; t < p.length; t += block_dim().x) {
    const Complex v = convolution_at(p, y, t);
    for (int side = 0; side < (second ? 2 : 1); ++side) {
      const int64_t c = c0 + side;
      float r = side == 0 ? v.re : v.im;
      if (p.post) r *= load_token<E>(post, p.post_stride, b, t, c);
      if (p.bias)
        r +=
            load_any(bias, p.bias_dtype, c * p.bias_stride) * load_token<E>(u, p.u_stride, b, t, c);
      out[(b * p.length + t) * p.channels + c] = E::from_float(r);
    }
  }
  sync_threads();  // the next entry reuses z and work
}

// Forward: grid (channel pairs, batch entries, looping over the batch in steps of the grid's
// height); buffers k_hat, z, work.
template <class E>
TM_DEVICE void fft_conv_forward_body(const FftConvParams& p) {
  const int64_t c0 = int64_t(block_idx().x) * 2;
  const FftConvSmem s = fft_conv_smem(p.n);
  fill_twiddles(s, p.n);
  sync_threads();
  const FftPlan q = fft_plan(p.n, p.log2n, E::kTensorCore);
  shared_ptr<Complex> k_hat = s.buf(0), z = s.buf(1), work = s.buf(2);
  filter_spectrum<E>(p, s, q, c0, k_hat, work);
  for (int64_t b = block_idx().y; b < p.batch; b += grid_dim().y) {
    fft_conv_forward_entry<E>(p, s, q, b, c0, k_hat, z, work);
  }
}

// Backward: grid (channel pairs, batch chunks); each block runs its chunk's batch entries in
// turn, so dk and d_bias are summed in a fixed order (the chunks' partial sums are added in
// chunk order by fft_conv_reduce_kernel). Buffers k_hat, v_hat, g_hat, work, dk_hat.
template <class E>
TM_DEVICE void fft_conv_backward_body(const FftConvParams& p) {
  using T = typename E::T;
  const int64_t c0 = int64_t(block_idx().x) * 2;
  const bool second = c0 + 1 < p.channels;
  const FftConvSmem s = fft_conv_smem(p.n);
  const FftPlan q = fft_plan(p.n, p.log2n, E::kTensorCore);
  fill_twiddles(s, p.n);
  sync_threads();
  const global_ptr<const T> u(static_cast<const T*>(p.u));
  const global_ptr<const T> pre(static_cast<const T*>(p.pre));
  const global_ptr<const T> post(static_cast<const T*>(p.post));
  const global_ptr<const T> dy(static_cast<const T*>(p.dy));
  const global_ptr<const uint8_t> bias(static_cast<const uint8_t*>(p.bias));
  const global_ptr<T> du(static_cast<T*>(p.out));
  const global_ptr<T> dpre(static_cast<T*>(p.grad_pre));
  const global_ptr<T> dpost(static_cast<T*>(p.grad_post));
  shared_ptr<Complex> k_hat = s.buf(0), a = s.buf(1), bbuf = s.buf(2), work = s.buf(3),
                      dk_hat = s.buf(4);
  filter_spectrum<E>(p, s, q, c0, k_hat, work);
  for (int64_t f = thread_idx().x; f < p.n; f += block_dim().x) {
    Complex zero;
    zero.re = 0.0f;
    zero.im = 0.0f;
    dk_hat[f] = zero;
  }
  float bias0 = 0.0f, bias1 = 0.0f;
  if (p.bias) {
    bias0 = load_any(bias, p.bias_dtype, c0 * p.bias_stride);
    if (second) bias1 = load_any(bias, p.bias_dtype, (c0 + 1) * p.bias_stride);
  }
  float dbias0 = 0.0f, dbias1 = 0.0f;  // this thread's share of d_bias

  const int64_t chunk = block_idx().y, b0 = chunk * p.batch_per_chunk;
  const int64_t b1 = b0 + p.batch_per_chunk < p.batch ? b0 + p.batch_per_chunk : p.batch;
  for (int64_t b = b0; b < b1; ++b) {
    // v_hat: the packed spectrum of v = pre_gate * u (in `a`, or in `work` after the transform).
    load_pair<E>(u, p.u_stride, pre, p.pre_stride, p.pre != nullptr, p, b, c0, a);
    sync_threads();
    shared_ptr<Complex> v_hat = transform<false>(s, q, a, work);
    shared_ptr<Complex> free_buf = v_hat == a ? work : a;
    if (p.post) {  // d_post_gate = dy * (k (*) v)
      shared_ptr<Complex> y = convolve_pair(s, q, v_hat, k_hat, bbuf, free_buf);
      for (int64_t t = thread_idx().x; t < p.length; t += block_dim().x) {
        const Complex v = convolution_at(p, y, t);
        for (int side = 0; side < (second ? 2 : 1); ++side) {
          const int64_t c = c0 + side;
          dpost[(b * p.length + t) * p.channels + c] =
              E::from_float((side == 0 ? v.re : v.im) * load_token<E>(dy, p.dy_stride, b, t, c));
        }
      }
      sync_threads();
    }
    // g_hat: the packed spectrum of g = post_gate * dy.
    load_pair<E>(dy, p.dy_stride, post, p.post_stride, p.post != nullptr, p, b, c0, bbuf, p.fold);
    sync_threads();
    shared_ptr<Complex> g_hat = transform<false>(s, q, bbuf, free_buf);
    shared_ptr<Complex> dv_hat = g_hat == bbuf ? free_buf : bbuf;
    for (int64_t f = thread_idx().x; f < p.n; f += block_dim().x) {
      const int64_t partner = q.partner(f);
      Complex v0, v1, g0, g1, k0, k1;
      unpack_pair(v_hat, f, partner, &v0, &v1);
      unpack_pair(g_hat, f, partner, &g0, &g1);
      unpack_pair(k_hat, f, partner, &k0, &k1);
      // dk spectra G conj(V) (summed over the batch, unnormalized); dv spectra G conj(K).
      dk_hat[f] =
          cplx_add(dk_hat[f], pack_pair(cplx_mul(g0, cplx_conj(v0)), cplx_mul(g1, cplx_conj(v1))));
      dv_hat[f] = pack_pair(cplx_mul(g0, cplx_conj(k0)), cplx_mul(g1, cplx_conj(k1)));
    }
    sync_threads();
    shared_ptr<Complex> dv = transform<true>(s, q, dv_hat, g_hat);
    for (int64_t t = thread_idx().x; t < p.length; t += block_dim().x) {
      const Complex v = dv[t];
      for (int side = 0; side < (second ? 2 : 1); ++side) {
        const int64_t c = c0 + side;
        const float dvc = side == 0 ? v.re : v.im;
        const float uu = load_token<E>(u, p.u_stride, b, t, c);
        float g = dvc;
        if (p.pre) g *= load_token<E>(pre, p.pre_stride, b, t, c);
        if (p.bias) {
          const float d = load_token<E>(dy, p.dy_stride, b, t, c);
          g += (side == 0 ? bias0 : bias1) * d;
          (side == 0 ? dbias0 : dbias1) += d * uu;
        }
        const int64_t o = (b * p.length + t) * p.channels + c;
        du[o] = E::from_float(g);
        if (p.pre) dpre[o] = E::from_float(dvc * uu);
      }
    }
    sync_threads();
  }
  // dk = the first Lk taps of the inverse of the summed spectra, over n sigma^2 (the plan's scale
  // of the two forward transforms), by the float32 radix-2 transform from natural order.
  shared_ptr<Complex> spare = s.buf(1);
  if (q.monarch()) {
    for (int64_t f = thread_idx().x; f < p.n; f += block_dim().x)
      spare[f] = dk_hat[q.position_of(f)];
    sync_threads();
    shared_ptr<Complex> t = spare;
    spare = dk_hat;
    dk_hat = t;
  }
  shared_ptr<Complex> dk = stockham_radix2<true>(s, p.n, p.log2n, dk_hat, spare);
  const global_ptr<uint8_t> grad_k(static_cast<uint8_t*>(p.grad_k));
  const global_ptr<float> partial_k(p.partial_k);
  const bool partial = p.chunks > 1;
  const float inv_n = 1.0f / (float(p.n) * q.sigma * q.sigma);
  for (int64_t t = thread_idx().x; t < p.taps; t += block_dim().x) {
    const Complex v = dk[t];
    for (int side = 0; side < (second ? 2 : 1); ++side) {
      const int64_t c = c0 + side;
      const float value = (side == 0 ? v.re : v.im) * inv_n;
      if (partial)
        partial_k[(chunk * p.channels + c) * p.taps + t] = value;
      else
        store_any(grad_k, p.k_dtype, c * p.taps + t, value);
    }
  }
  if (!p.bias) return;
  // d_bias: a fixed-order tree over the block's threads (deterministic).
  sync_threads();
  shared_ptr<float> red = ptr_cast<float>(s.buf(1));
  red[thread_idx().x] = dbias0;
  red[block_dim().x + thread_idx().x] = dbias1;
  sync_threads();
  for (uint32_t width = block_dim().x / 2; width > 0; width /= 2) {
    if (thread_idx().x < width) {
      red[thread_idx().x] = red[thread_idx().x] + red[thread_idx().x + width];
      red[block_dim().x + thread_idx().x] =
          red[block_dim().x + thread_idx().x] + red[block_dim().x + thread_idx().x + width];
    }
    sync_threads();
  }
  if (thread_idx().x == 0) {
    const global_ptr<uint8_t> grad_bias(static_cast<uint8_t*>(p.grad_bias));
    const global_ptr<float> partial_bias(p.partial_bias);
    for (int side = 0; side < (second ? 2 : 1); ++side) {
      const float value = side == 0 ? red[0] : red[block_dim().x];
      if (partial)
        partial_bias[chunk * p.channels + c0 + side] = value;
      else
        store_any(grad_bias, p.bias_dtype, c0 + side, value);
    }
  }
}

// dk and d_bias from the chunks' partial sums, added in chunk order: one thread per element of
// dk ([C, Lk]) then of d_bias ([C]).
TM_DEVICE void fft_conv_reduce_body(const FftConvParams& p) {
  const int64_t total_k = p.channels * p.taps;
  const int64_t i = grid_thread();
  const global_ptr<const float> partial_k(p.partial_k);
  const global_ptr<const float> partial_bias(p.partial_bias);
  if (i < total_k) {
    float sum = 0.0f;
    for (int64_t ch = 0; ch < p.chunks; ++ch) sum += partial_k[ch * total_k + i];
    store_any(global_ptr<uint8_t>(static_cast<uint8_t*>(p.grad_k)), p.k_dtype, i, sum);
  } else if (p.bias && i < total_k + p.channels) {
    const int64_t c = i - total_k;
    float sum = 0.0f;
    for (int64_t ch = 0; ch < p.chunks; ++ch) sum += partial_bias[ch * p.channels + c];
    store_any(global_ptr<uint8_t>(static_cast<uint8_t*>(p.grad_bias)), p.bias_dtype, c, sum);
  }
}

template <class E>
TM_GLOBAL void fft_conv_forward_kernel(FftConvParams p) {
  fft_conv_forward_body<E>(p);
}

template <class E>
TM_GLOBAL void fft_conv_backward_kernel(FftConvParams p) {
  fft_conv_backward_body<E>(p);
}

TM_GLOBAL void fft_conv_reduce_kernel(FftConvParams p) {
  fft_conv_reduce_body(p);
}

}  // namespace tokenmix::cuda
