// fft_conv on CUDA for transforms longer than one block's shared memory
// (kFftConvCudaBlockSize < n <= kFftConvCudaMaxSize): more passes over a float32 workspace in
// global memory, launched in turn by fft_launch.h. Signals are channel pairs packed as complex
// values, as in fft_conv.h, one [n] complex row per (batch entry, pair), a chunk of pairs and
// batch entries at a time.
//
// The transform is the four-step split n = N1 * N2 (N1 >= N2, both at most
// kFftConvCudaBlockSize), with t = N2 t1 + t2 and f = f1 + N1 f2:
//   columns: for each t2, an N1-point transform over t1, times W_n^(t2 f1), in place ([f1][t2]);
//   rows:    for each f1, an N2-point transform over t2, written to f1 + N1 f2 of another
//            buffer (natural order).
// The in-block transforms are fft_transform.h's plans (Monarch on tensor cores for fp16/bf16
// signals, radix-2 on FMAs for float32 ones, filters and dk), several per block (2048 points),
// read back from their plan's order; the row pass undoes both plans' scales, so the pair of
// passes is exactly the unnormalized DFT. The inverse is the same with conjugate roots: the
// in-block transforms run forward on conjugated data (conj DFT(conj x) is the unnormalized
// inverse DFT, and a Monarch plan's own inverse expects its digit-reversed order instead).
//
// Between the transforms, grid-stride pointwise kernels: loading the pairs, the spectral
// products (the pair unpacking of fft_conv.h, conj Z[-f] at (n - f) mod n), the epilogues with
// the gates and the skip term, dk's taps and d_bias (a fixed-order sum per channel).
#pragma once

#include <cstdint>

#include "tokenmix/cuda/fft_conv.h"

namespace tokenmix::cuda {

// What a multi-pass launch works on. Buffers are float32 complex rows of n points.
struct FftPassParams {
  FftConvParams conv;      // shapes, tensors and outputs; conv.n is the transform length
  int64_t q0, pairs;       // the pair chunk [q0, q0 + pairs)
  int64_t chunk_channels;  // channels of the pair chunk: 2 * pairs, or one less at the end
  int log2n1, log2n2;      // n = N1 * N2
  int64_t b0, entries;     // the batch chunk [b0, b0 + entries)
  int64_t signals;         // rows in src (transforms and products)
  float* src;              // transforms: columns in place; rows read here
  float* dst;              // rows written here; products' output
  const float* operand;    // products' second operand
  int mode;                // kernel-specific selector (see each kernel)
  bool accumulate;         // products: add to dst (dk's spectrum over batch chunks)
};

// ---- transforms

inline constexpr int kFftConvCudaBlockLog2 = 11;  // log2 kFftConvCudaBlockSize
static_assert(int64_t(1) << kFftConvCudaBlockLog2 == kFftConvCudaBlockSize, "block size");

// The plan of an in-block transform of 2^log2 points.
TM_DEVICE FftPlan pass_plan(int log2, bool tensor_cores) {
  return fft_plan(int64_t(1) << log2, log2, tensor_cores);
}

// Column pass: each block takes G = kFftConvCudaBlockSize / N1 adjacent columns of a row.
template <bool kTensorCore, bool kInverse>
TM_DEVICE void fft_columns_body(const FftPassParams& p) {
  const int64_t n1 = int64_t(1) << p.log2n1, n2 = int64_t(1) << p.log2n2, n = n1 * n2;
  const int log2g = kFftConvCudaBlockLog2 - p.log2n1, log2groups = p.log2n2 - log2g;
  const int64_t g_count = int64_t(1) << log2g, groups = int64_t(1) << log2groups;
  const FftPlan q = pass_plan(p.log2n1, kTensorCore);
  const FftConvSmem s = fft_block_smem(n1, kFftConvCudaBlockSize);
  fill_twiddles(s, n1);
  sync_threads();
  const global_ptr<float> x(p.src);
  for (int64_t blk = block_idx().x; blk < p.signals * groups; blk += grid_dim().x) {
    const int64_t base = (blk >> log2groups) * n, t2 = (blk & (groups - 1)) * g_count;
    shared_ptr<Complex> data = s.buf(0);
    for (int64_t i = thread_idx().x; i < g_count * n1; i += block_dim().x) {
      const int64_t g = i & (g_count - 1), t1 = i >> log2g;
      const int64_t at = 2 * (base + t1 * n2 + t2 + g);
      data[g * n1 + t1] = Complex{x[at], kInverse ? -x[at + 1] : x[at + 1]};
    }
    sync_threads();
    shared_ptr<Complex> r = transform<false>(s, q, data, s.buf(1), g_count);
    for (int64_t i = thread_idx().x; i < g_count * n1; i += block_dim().x) {
      const int64_t g = i & (g_count - 1), pos = i >> log2g, f1 = q.frequency_at(pos);
      float sn, cs;  // W_n^(t2 f1), exact argument: the product is below 2^22
      sincospi_f32((kInverse ? 2.0f : -2.0f) * float(((t2 + g) * f1) & (n - 1)) / float(n), &sn,
                   &cs);
      Complex v = r[g * n1 + pos];
      if (kInverse) v = cplx_conj(v);
      v = cplx_mul(v, Complex{cs, sn});
      const int64_t at = 2 * (base + f1 * n2 + t2 + g);
      x[at] = v.re;
      x[at + 1] = v.im;
    }
    sync_threads();  // the next group reuses the buffers
  }
}

// Row pass: each block takes G = kFftConvCudaBlockSize / N2 adjacent rows f1 of a signal.
template <bool kTensorCore, bool kInverse>
TM_DEVICE void fft_rows_body(const FftPassParams& p) {
  const int64_t n1 = int64_t(1) << p.log2n1, n2 = int64_t(1) << p.log2n2, n = n1 * n2;
  const int log2g = kFftConvCudaBlockLog2 - p.log2n2, log2groups = p.log2n1 - log2g;
  const int64_t g_count = int64_t(1) << log2g, groups = int64_t(1) << log2groups;
  const FftPlan q = pass_plan(p.log2n2, kTensorCore);
  const float unscale = 1.0f / (pass_plan(p.log2n1, kTensorCore).sigma * q.sigma);
  const FftConvSmem s = fft_block_smem(n2, kFftConvCudaBlockSize);
  fill_twiddles(s, n2);
  sync_threads();
  const global_ptr<const float> x(p.src);
  const global_ptr<float> out(p.dst);
  for (int64_t blk = block_idx().x; blk < p.signals * groups; blk += grid_dim().x) {
    const int64_t base = (blk >> log2groups) * n, f1 = (blk & (groups - 1)) * g_count;
    shared_ptr<Complex> data = s.buf(0);
    for (int64_t i = thread_idx().x; i < g_count * n2; i += block_dim().x) {
      const int64_t at = 2 * (base + f1 * n2 + i);  // rows f1 .. f1 + G - 1 are contiguous
      data[i] = Complex{x[at], kInverse ? -x[at + 1] : x[at + 1]};
    }
    sync_threads();
    shared_ptr<Complex> r = transform<false>(s, q, data, s.buf(1), g_count);
    for (int64_t i = thread_idx().x; i < g_count * n2; i += block_dim().x) {
      const int64_t g = i & (g_count - 1), pos = i >> log2g, f2 = q.frequency_at(pos);
      Complex v = cplx_scale(r[g * n2 + pos], unscale);
      if (kInverse) v = cplx_conj(v);
      const int64_t at = 2 * (base + f1 + g + n1 * f2);
      out[at] = v.re;
      out[at + 1] = v.im;
    }
    sync_threads();
  }
}

// ---- pointwise kernels (grid-stride over their elements)

// Loads rows of channel pairs into src, zero beyond the signal: mode 0 the pairs of
// v = pre_gate * u, mode 1 of g = post_gate * dy (wrapped when the convolution folds;
// signal_token), batch entries b0 ..; mode 2 the filter's.
template <class E>
TM_DEVICE void fft_load_body(const FftPassParams& p) {
  using T = typename E::T;
  const FftConvParams& c = p.conv;
  const int64_t n = c.n;
  const global_ptr<float> dst(p.src);
  const global_ptr<const T> u(static_cast<const T*>(p.mode == 0 ? c.u : c.dy));
  const global_ptr<const T> gate(static_cast<const T*>(p.mode == 0 ? c.pre : c.post));
  const int64_t* us = p.mode == 0 ? c.u_stride : c.dy_stride;
  const int64_t* gs = p.mode == 0 ? c.pre_stride : c.post_stride;
  const bool has_gate = (p.mode == 0 ? c.pre : c.post) != nullptr;
  const global_ptr<const uint8_t> k(static_cast<const uint8_t*>(c.k));
  for (int64_t i = grid_thread(); i < p.signals * n; i += grid_threads()) {
    const int64_t row = i >> c.log2n, pos = i & (n - 1), pair = p.q0 + row % p.pairs;
    const int64_t b = p.b0 + row / p.pairs;
    const int64_t t = p.mode == 2 ? pos : signal_token(c, pos, p.mode == 1 && c.fold);
    float v[2] = {0.0f, 0.0f};
    for (int side = 0; side < 2; ++side) {
      const int64_t ch = 2 * pair + side;
      if (ch >= c.channels) continue;
      if (p.mode == 2) {
        if (t < c.taps) v[side] = load_any(k, c.k_dtype, ch * c.k_stride[0] + t * c.k_stride[1]);
      } else if (t >= 0) {
        v[side] = load_token<E>(u, us, b, t, ch);
        if (has_gate) v[side] *= load_token<E>(gate, gs, b, t, ch);
      }
    }
    dst[2 * i] = v[0];
    dst[2 * i + 1] = v[1];
  }
}

TM_DEVICE Complex load_complex(const global_ptr<const float>& x, int64_t i) {
  return Complex{x[2 * i], x[2 * i + 1]};
}

// The pair spectra at f of the packed spectrum in row `base` (natural order).
TM_DEVICE void unpack_global(const global_ptr<const float>& z, int64_t base, int64_t f, int64_t n,
                             Complex* x0, Complex* x1) {
  const Complex a = load_complex(z, base + f);
  const Complex b = cplx_conj(load_complex(z, base + ((n - f) & (n - 1))));
  x0->re = 0.5f * (a.re + b.re);
  x0->im = 0.5f * (a.im + b.im);
  x1->re = 0.5f * (a.im - b.im);
  x1->im = -0.5f * (a.re - b.re);
}

// Products, all divided by n (the inverse transform's normalization, so that spectra stay
// within n times the signals' magnitude):
inline constexpr int kProductFilter = 0;      // dst = pair-wise src * K (K: operand [P, n])
inline constexpr int kProductFilterConj = 1;  // dst = pair-wise src * conj K
inline constexpr int kProductCross = 2;       // dst[P, n] (+)= sum over rows src * conj operand

TM_DEVICE void fft_product_body(const FftPassParams& p) {
  const int64_t n = p.conv.n;
  const global_ptr<const float> a(p.src), b(p.operand);
  const global_ptr<float> out(p.dst);
  const int64_t rows = p.mode == kProductCross ? p.pairs : p.signals;
  const float inv_n = 1.0f / float(n);
  for (int64_t i = grid_thread(); i < rows * n; i += grid_threads()) {
    const int64_t row = i >> p.conv.log2n, f = i & (n - 1);
    Complex w;
    if (p.mode == kProductCross) {  // sum over the chunk's entries, in batch order
      Complex s0{0.0f, 0.0f}, s1{0.0f, 0.0f};
      for (int64_t e = 0; e < p.entries; ++e) {
        const int64_t base = (e * p.pairs + row) * n;
        Complex g0, g1, v0, v1;
        unpack_global(a, base, f, n, &g0, &g1);
        unpack_global(b, base, f, n, &v0, &v1);
        s0 = cplx_add(s0, cplx_mul(g0, cplx_conj(v0)));
        s1 = cplx_add(s1, cplx_mul(g1, cplx_conj(v1)));
      }
      w = cplx_scale(pack_pair(s0, s1), inv_n);
      if (p.accumulate) w = cplx_add(w, Complex{out[2 * i], out[2 * i + 1]});
    } else {
      Complex x0, x1, k0, k1;
      unpack_global(a, row * n, f, n, &x0, &x1);
      unpack_global(b, (row % p.pairs) * n, f, n, &k0, &k1);
      if (p.mode == kProductFilterConj) {
        k0 = cplx_conj(k0);
        k1 = cplx_conj(k1);
      }
      w = cplx_scale(pack_pair(cplx_mul(x0, k0), cplx_mul(x1, k1)), inv_n);
    }
    out[2 * i] = w.re;
    out[2 * i + 1] = w.im;
  }
}

// The forward's outputs of the chunk: y = post_gate * conv + bias * u, from src (the inverse
// transforms: the convolutions, folded when circular ones are computed as linear ones).
template <class E>
TM_DEVICE void fft_forward_epilogue_body(const FftPassParams& p) {
  using T = typename E::T;
  const FftConvParams& c = p.conv;
  const global_ptr<const float> conv(p.src);
  const global_ptr<const T> u(static_cast<const T*>(c.u));
  const global_ptr<const T> post(static_cast<const T*>(c.post));
  const global_ptr<const uint8_t> bias(static_cast<const uint8_t*>(c.bias));
  const global_ptr<T> out(static_cast<T*>(c.out));
  const int64_t cc = p.chunk_channels, count = p.entries * c.length * cc;
  for (int64_t i = grid_thread(); i < count; i += grid_threads()) {
    const int64_t local = i % cc, ch = 2 * p.q0 + local, t = (i / cc) % c.length;
    const int64_t e = i / (cc * c.length), b = p.b0 + e;
    const int64_t at = 2 * ((e * p.pairs + local / 2) * c.n + t) + (local & 1);
    float r = conv[at];
    if (c.fold && t < c.taps - 1) r += conv[at + 2 * c.length];
    if (c.post) r *= load_token<E>(post, c.post_stride, b, t, ch);
    if (c.bias)
      r +=
          load_any(bias, c.bias_dtype, ch * c.bias_stride) * load_token<E>(u, c.u_stride, b, t, ch);
    out[(b * c.length + t) * c.channels + ch] = E::from_float(r);
  }
}

// The backward's per-token gradients of the chunk from src (dv, the inverse of G conj K / n)
// and operand (k (*) v, with a post_gate): du, d_pre_gate, d_post_gate.
template <class E>
TM_DEVICE void fft_backward_epilogue_body(const FftPassParams& p) {
  using T = typename E::T;
  const FftConvParams& c = p.conv;
  const global_ptr<const float> dv_all(p.src), y_all(p.operand);
  const global_ptr<const T> u(static_cast<const T*>(c.u));
  const global_ptr<const T> pre(static_cast<const T*>(c.pre));
  const global_ptr<const T> dy(static_cast<const T*>(c.dy));
  const global_ptr<const uint8_t> bias(static_cast<const uint8_t*>(c.bias));
  const global_ptr<T> du(static_cast<T*>(c.out));
  const global_ptr<T> dpre(static_cast<T*>(c.grad_pre));
  const global_ptr<T> dpost(static_cast<T*>(c.grad_post));
  const int64_t cc = p.chunk_channels, count = p.entries * c.length * cc;
  for (int64_t i = grid_thread(); i < count; i += grid_threads()) {
    const int64_t local = i % cc, ch = 2 * p.q0 + local, t = (i / cc) % c.length;
    const int64_t e = i / (cc * c.length), b = p.b0 + e;
    const int64_t at = 2 * ((e * p.pairs + local / 2) * c.n + t) + (local & 1);
    const float dv = dv_all[at];
    const int64_t o = (b * c.length + t) * c.channels + ch;
    float g = dv;
    if (c.pre) {
      g *= load_token<E>(pre, c.pre_stride, b, t, ch);
      dpre[o] = E::from_float(dv * load_token<E>(u, c.u_stride, b, t, ch));
    }
    if (c.bias)
      g += load_any(bias, c.bias_dtype, ch * c.bias_stride) *
           load_token<E>(dy, c.dy_stride, b, t, ch);
    du[o] = E::from_float(g);
    if (c.post) {
      float y = y_all[at];
      if (c.fold && t < c.taps - 1) y += y_all[at + 2 * c.length];
      dpost[o] = E::from_float(y * load_token<E>(dy, c.dy_stride, b, t, ch));
    }
  }
}

// dk of the pair chunk = the first Lk taps of src (the inverse of dk's spectrum), in k's dtype.
TM_DEVICE void fft_store_dk_body(const FftPassParams& p) {
  const FftConvParams& c = p.conv;
  const global_ptr<const float> x(p.src);
  const global_ptr<uint8_t> grad_k(static_cast<uint8_t*>(c.grad_k));
  for (int64_t i = grid_thread(); i < p.chunk_channels * c.taps; i += grid_threads()) {
    const int64_t local = i / c.taps, t = i % c.taps;
    store_any(grad_k, c.k_dtype, 2 * p.q0 * c.taps + i,
              x[2 * ((local / 2) * c.n + t) + (local & 1)]);
  }
}

// d_bias[c] = sum over (b, t) of dy * u: one block per channel, each thread a fixed stride of
// the tokens, then a fixed-order tree (deterministic).
template <class E>
TM_DEVICE void fft_dbias_body(const FftPassParams& p) {
  using T = typename E::T;
  const FftConvParams& c = p.conv;
  const global_ptr<const T> u(static_cast<const T*>(c.u));
  const global_ptr<const T> dy(static_cast<const T*>(c.dy));
  const int64_t ch = block_idx().x;
  float sum = 0.0f;
  for (int64_t i = thread_idx().x; i < c.batch * c.length; i += block_dim().x) {
    const int64_t b = i / c.length, t = i % c.length;
    sum += load_token<E>(dy, c.dy_stride, b, t, ch) * load_token<E>(u, c.u_stride, b, t, ch);
  }
  shared_ptr<float> red = dynamic_shared<float>();
  red[thread_idx().x] = sum;
  sync_threads();
  for (uint32_t width = block_dim().x / 2; width > 0; width /= 2) {
    if (thread_idx().x < width)
      red[thread_idx().x] = red[thread_idx().x] + red[thread_idx().x + width];
    sync_threads();
  }
  if (thread_idx().x == 0)
    store_any(global_ptr<uint8_t>(static_cast<uint8_t*>(c.grad_bias)), c.bias_dtype, ch, red[0]);
}

// ---- kernels

template <bool kTensorCore, bool kInverse>
TM_GLOBAL void fft_columns_kernel(FftPassParams p) {
  fft_columns_body<kTensorCore, kInverse>(p);
}
template <bool kTensorCore, bool kInverse>
TM_GLOBAL void fft_rows_kernel(FftPassParams p) {
  fft_rows_body<kTensorCore, kInverse>(p);
}
template <class E>
TM_GLOBAL void fft_load_kernel(FftPassParams p) {
  fft_load_body<E>(p);
}
TM_GLOBAL void fft_product_kernel(FftPassParams p) {
  fft_product_body(p);
}
template <class E>
TM_GLOBAL void fft_forward_epilogue_kernel(FftPassParams p) {
  fft_forward_epilogue_body<E>(p);
}
template <class E>
TM_GLOBAL void fft_backward_epilogue_kernel(FftPassParams p) {
  fft_backward_epilogue_body<E>(p);
}
TM_GLOBAL void fft_store_dk_kernel(FftPassParams p) {
  fft_store_dk_body(p);
}
template <class E>
TM_GLOBAL void fft_dbias_kernel(FftPassParams p) {
  fft_dbias_body<E>(p);
}

}  // namespace tokenmix::cuda
