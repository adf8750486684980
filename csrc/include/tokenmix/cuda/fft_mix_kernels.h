// fourier_mix, global_filter and spectral_gate on CUDA, on the SIMT layer: passes of line
// transforms of any length (fft_lines.h) over the operands and a float32 complex workspace,
// launched in turn by fft_mix_launch.h. float32 outside the transforms (inputs read as float32,
// outputs rounded once). For fp16/bf16 inputs the transforms run on tensor cores (Monarch),
// except those whose spectra feed a parameter's gradient (global_filter's backward spectra,
// spectral_gate's backward), which stay float32.
//
// - fourier_mix: the channel transform of every token into the workspace, then the token
//   transform of every channel, whose real part is the output.
// - global_filter: the half spectrum of every row (bins 0 .. W/2), then per column the transform,
//   the product with the weight / (H W) and the inverse transform, then the real inverse of every
//   row (Hermitian fill, like irfft2). Backward: the 2-D half spectra of x and dy, the weight's
//   gradient c_f sum_b G conj(X) / (H W) in batch order, and dx as the same filter with
//   conj(weight) applied to G.
// - spectral_gate: one kernel per direction, one line per (batch entry, channel); the backward
//   writes each channel's share of d_gate and d_bias, which fft_gate_reduce_kernel adds in a
//   fixed order (no atomics).
#pragma once

#include <cmath>
#include <cstdint>

#include "tokenmix/cuda/fft_lines.h"
#include "tokenmix/cuda/warp_gemm.h"

namespace tokenmix::cuda {

// One pass over lines: load, forward transform, product with a complex weight, inverse
// transform, store (each step optional but the load and the store).
struct FftLinePassParams {
  LinePlan plan;
  int64_t lines, dim1, dim2;  // line l = (l / (dim1 dim2), (l / dim2) % dim1, l % dim2)
  // Source: a real tensor of the input's dtype (E::T) or a float32 complex workspace.
  const void* src;
  bool src_complex;
  int64_t src_stride[4];  // per line index (3) then per point, in elements (complex ones)
  int64_t src_points;     // points stored per line; the rest are zero, or with `hermitian`...
  bool hermitian;         // ...conj src[n - t]: src holds bins 0 .. n/2 of a real spectrum
  bool forward, inverse;
  bool tensor_cores;         // Monarch transforms for fp16/bf16 inputs (else float32 radix-2)
  const float* weight;       // complex, or null
  int64_t weight_stride[3];  // per line index dim1, dim2, then per point (complex elements)
  bool conj_weight;
  float scale;  // multiplies the weight
  // Destination: a float32 complex workspace, or the real part in E::T.
  void* dst;
  bool dst_complex;
  int64_t dst_stride[4];
  int64_t dst_points;
};

struct LineIndex {
  int64_t i0, i1, i2;
};
TM_HOST_DEVICE LineIndex line_index(const FftLinePassParams& p, int64_t line) {
  return LineIndex{line / (p.dim1 * p.dim2), (line / p.dim2) % p.dim1, line % p.dim2};
}
TM_HOST_DEVICE int64_t line_offset(const int64_t* stride, const LineIndex& at, int64_t t) {
  return at.i0 * stride[0] + at.i1 * stride[1] + at.i2 * stride[2] + t * stride[3];
}

template <class E>
TM_DEVICE Complex load_line_point(const FftLinePassParams& p, const LineIndex& at, int64_t t) {
  using T = typename E::T;
  if (!p.src_complex) {
    if (t >= p.src_points) return Complex{0.0f, 0.0f};
    const global_ptr<const T> x(static_cast<const T*>(p.src));
    return Complex{E::to_float(x[line_offset(p.src_stride, at, t)]), 0.0f};
  }
  const global_ptr<const float> x(static_cast<const float*>(p.src));
  if (!p.hermitian) {
    if (t >= p.src_points) return Complex{0.0f, 0.0f};
    const int64_t o = 2 * line_offset(p.src_stride, at, t);
    return Complex{x[o], x[o + 1]};
  }
  // A real inverse counts bins 0 and n/2 once: their imaginary parts do not reach it (irfft).
  const int64_t n = p.plan.n, bin = t < p.src_points ? t : n - t;
  const int64_t o = 2 * line_offset(p.src_stride, at, bin);
  Complex v{x[o], x[o + 1]};
  if (bin == 0 || 2 * bin == n) v.im = 0.0f;
  return t < p.src_points ? v : cplx_conj(v);
}

template <class E>
TM_DEVICE void fft_line_pass_body(const FftLinePassParams& p) {
  using T = typename E::T;
  const LinePlan& q = p.plan;
  const LineSmem l = line_block_setup(q, E::kTensorCore && p.tensor_cores);
  const int64_t points = q.group * q.m, mask = q.m - 1;
  for (int64_t first = int64_t(block_idx().x) * q.group; first < p.lines;
       first += int64_t(grid_dim().x) * q.group) {
    shared_ptr<Complex> data = l.s.buf(0);
    for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
      const int64_t line = first + (i >> q.log2m), t = i & mask;
      Complex v{0.0f, 0.0f};
      if (line < p.lines && t < q.n) v = load_line_point<E>(p, line_index(p, line), t);
      data[i] = v;
    }
    sync_threads();
    if (p.forward) data = line_dft<false>(l, data, other_buffer(l, data));
    if (p.weight) {
      const global_ptr<const float> w(p.weight);
      for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
        const int64_t line = first + (i >> q.log2m), t = i & mask;
        if (line >= p.lines || t >= q.n) continue;
        const LineIndex at = line_index(p, line);
        const int64_t o =
            2 * (at.i1 * p.weight_stride[0] + at.i2 * p.weight_stride[1] + t * p.weight_stride[2]);
        Complex k{w[o] * p.scale, w[o + 1] * p.scale};
        if (p.conj_weight) k = cplx_conj(k);
        data[i] = cplx_mul(data[i], k);
      }
      sync_threads();
    }
    if (p.inverse) data = line_dft<true>(l, data, other_buffer(l, data));
    for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
      const int64_t line = first + (i >> q.log2m), t = i & mask;
      if (line >= p.lines || t >= p.dst_points) continue;
      const int64_t o = line_offset(p.dst_stride, line_index(p, line), t);
      const Complex v = data[i];
      if (p.dst_complex) {
        const global_ptr<float> out(static_cast<float*>(p.dst));
        out[2 * o] = v.re;
        out[2 * o + 1] = v.im;
      } else {
        const global_ptr<T> out(static_cast<T*>(p.dst));
        out[o] = E::from_float(v.re);
      }
    }
    sync_threads();  // the next group reuses the buffers
  }
}

// ---- global_filter's weight gradient

struct FilterGradParams {
  int64_t batch, height, width, bins, channels;
  const float* x_hat;  // [B, H, bins, C] complex: the 2-D half spectra of x and dy
  const float* g_hat;
  float* grad_weight;  // [H, bins, C, 2]
};

// grad_weight[h, f, c] = c_f sum_b G conj(X) / (H W), c_f = 1 at bins 0 and W/2 (a real inverse
// counts them once), else 2; one thread per element, the batch summed in order.
TM_DEVICE void fft_filter_grad_body(const FilterGradParams& p) {
  const int64_t per_entry = p.height * p.bins * p.channels;
  const global_ptr<const float> x(p.x_hat), g(p.g_hat);
  const global_ptr<float> out(p.grad_weight);
  for (int64_t i = grid_thread(); i < per_entry; i += grid_threads()) {
    const int64_t f = (i / p.channels) % p.bins;
    Complex sum{0.0f, 0.0f};
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t o = 2 * (b * per_entry + i);
      sum = cplx_add(sum, cplx_mul(Complex{g[o], g[o + 1]}, Complex{x[o], -x[o + 1]}));
    }
    const float count = (f == 0 || 2 * f == p.width) ? 1.0f : 2.0f;
    const float scale = count / float(p.height * p.width);
    out[2 * i] = sum.re * scale;
    out[2 * i + 1] = sum.im * scale;
  }
}

// ---- spectral_gate

struct SpectralGateParams {
  LinePlan plan;  // n = L
  int64_t batch, length, channels, heads, bins;
  bool modrelu;
  const void* x;
  int64_t x_stride[3];
  const void* dy;
  int64_t dy_stride[3];
  const float* gate;  // [B, heads, bins, 2]
  const float* bias;  // [heads, bins] or null
  void* out;          // contiguous [B, L, C]: y, or dx
  float* part_gate;   // backward: [B, C, bins] complex, each channel's share of d_gate
  float* part_bias;   // backward with a bias: [B, C, bins]
  float* grad_gate;   // [B, heads, bins, 2]
  float* grad_bias;   // [heads, bins] or null
};

// modReLU: relu(|w| + bias) w / |w|, 0 where w == 0.
TM_HOST_DEVICE Complex modrelu_forward(Complex w, float bias) {
  const float s = sqrtf(w.re * w.re + w.im * w.im);
  const float factor = (s > 0.0f && s + bias > 0.0f) ? (s + bias) / s : 0.0f;
  return Complex{w.re * factor, w.im * factor};
}

// modReLU's backward at w for the incoming gradient gz (torch's complex convention): returns the
// gradient of w, adds the bias's to *gbias. Zero where the output is clamped to 0.
TM_HOST_DEVICE Complex modrelu_backward(Complex w, Complex gz, float bias, float* gbias) {
  const float s = sqrtf(w.re * w.re + w.im * w.im);
  if (!(s > 0.0f && s + bias > 0.0f)) return Complex{0.0f, 0.0f};
  const float proj = (gz.re * w.re + gz.im * w.im) / s;  // Re(conj(gz) w) / s
  *gbias += proj;
  const float gain = 1.0f + bias / s, radial = bias * proj / (s * s);
  return Complex{gz.re * gain - radial * w.re, gz.im * gain - radial * w.im};
}

template <class E>
TM_DEVICE float load_gate_token(const void* data, const int64_t* stride, int64_t b, int64_t t,
                                int64_t c) {
  using T = typename E::T;
  const global_ptr<const T> x(static_cast<const T*>(data));
  return E::to_float(x[b * stride[0] + t * stride[1] + c * stride[2]]);
}

// Forward: per line (b, c), y = irfft(act(gate[b, h] * rfft(x))), the inverse's 1/L included.
template <class E>
TM_DEVICE void spectral_gate_forward_body(const SpectralGateParams& p) {
  using T = typename E::T;
  const LinePlan& q = p.plan;
  const LineSmem l = line_block_setup(q, E::kTensorCore);
  const int64_t points = q.group * q.m, mask = q.m - 1, n = q.n, lines = p.batch * p.channels;
  const int64_t d = p.channels / p.heads;
  const global_ptr<const float> gate(p.gate), bias(p.bias);
  const global_ptr<T> out(static_cast<T*>(p.out));
  const float inv_l = 1.0f / float(n);
  for (int64_t first = int64_t(block_idx().x) * q.group; first < lines;
       first += int64_t(grid_dim().x) * q.group) {
    shared_ptr<Complex> data = l.s.buf(0);
    for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
      const int64_t line = first + (i >> q.log2m), t = i & mask;
      Complex v{0.0f, 0.0f};
      if (line < lines && t < n)
        v.re = load_gate_token<E>(p.x, p.x_stride, line / p.channels, t, line % p.channels);
      data[i] = v;
    }
    sync_threads();
    data = line_dft<false>(l, data, other_buffer(l, data));
    shared_ptr<Complex> z = other_buffer(l, data);
    for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
      const int64_t line = first + (i >> q.log2m), t = i & mask;
      Complex v{0.0f, 0.0f};
      if (line < lines && t < n) {
        // Frequency t is bin t or the mirror of bin n - t (a real signal's spectrum).
        const int64_t b = line / p.channels, h = (line % p.channels) / d;
        const int64_t bin = 2 * t <= n ? t : n - t, base = i - t;
        const int64_t g = 2 * ((b * p.heads + h) * p.bins + bin);
        v = cplx_mul(data[base + bin], Complex{gate[g], gate[g + 1]});
        if (p.modrelu) v = modrelu_forward(v, p.bias ? bias[h * p.bins + bin] : 0.0f);
        if (bin == 0 || 2 * bin == n) v.im = 0.0f;  // irfft drops them
        if (bin != t) v = cplx_conj(v);
      }
      z[i] = v;
    }
    sync_threads();
    shared_ptr<Complex> y = line_dft<true>(l, z, data);
    for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
      const int64_t line = first + (i >> q.log2m), t = i & mask;
      if (line >= lines || t >= n) continue;
      const int64_t b = line / p.channels, c = line % p.channels;
      out[(b * n + t) * p.channels + c] = E::from_float(Complex(y[i]).re * inv_l);
    }
    sync_threads();
  }
}

// Backward: per line (b, c), x and dy packed as x + i dy through one transform (float32 for
// every dtype: the spectra feed d_gate and d_bias, sums whose cancellation would magnify the
// errors of fp16 tensor-core operands; measured 4e-3 relative at L = 1000). With X, D their
// spectra, w = gate X and gz = c_f D / L (c_f = 1 at bins 0 and L/2, else 2), gW = gz or
// modReLU's backward of it; the line's shares d_gate += gW conj(X) and d_bias += gb, and
// dx = Re(inverse DFT of gW conj(gate) over bins 0 .. L/2, zero above).
template <class E>
TM_DEVICE void spectral_gate_backward_body(const SpectralGateParams& p) {
  using T = typename E::T;
  const LinePlan& q = p.plan;
  const LineSmem l = line_block_setup(q, false);
  const int64_t points = q.group * q.m, mask = q.m - 1, n = q.n, lines = p.batch * p.channels;
  const int64_t d = p.channels / p.heads;
  const global_ptr<const float> gate(p.gate), bias(p.bias);
  const global_ptr<float> part_gate(p.part_gate), part_bias(p.part_bias);
  const global_ptr<T> out(static_cast<T*>(p.out));
  const float inv_l = 1.0f / float(n);
  for (int64_t first = int64_t(block_idx().x) * q.group; first < lines;
       first += int64_t(grid_dim().x) * q.group) {
    shared_ptr<Complex> data = l.s.buf(0);
    for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
      const int64_t line = first + (i >> q.log2m), t = i & mask;
      Complex v{0.0f, 0.0f};
      if (line < lines && t < n) {
        const int64_t b = line / p.channels, c = line % p.channels;
        v.re = load_gate_token<E>(p.x, p.x_stride, b, t, c);
        v.im = load_gate_token<E>(p.dy, p.dy_stride, b, t, c);
      }
      data[i] = v;
    }
    sync_threads();
    data = line_dft<false>(l, data, other_buffer(l, data));
    shared_ptr<Complex> dx_hat = other_buffer(l, data);
    for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
      const int64_t line = first + (i >> q.log2m), f = i & mask;
      Complex v{0.0f, 0.0f};
      if (line < lines && f < p.bins) {
        const int64_t b = line / p.channels, h = (line % p.channels) / d, base = i - f;
        const Complex a = data[i], m = cplx_conj(data[base + (n - f) % n]);
        const Complex x{0.5f * (a.re + m.re), 0.5f * (a.im + m.im)};     // (Z[f] + conj Z[-f]) / 2
        const Complex dyf{0.5f * (a.im - m.im), -0.5f * (a.re - m.re)};  // (Z[f] - conj Z[-f]) / 2i
        const float count = (f == 0 || 2 * f == n) ? 1.0f : 2.0f;
        const int64_t g = 2 * ((b * p.heads + h) * p.bins + f);
        const Complex gf{gate[g], gate[g + 1]};
        Complex gw = cplx_scale(dyf, count * inv_l);
        float gb = 0.0f;
        if (p.modrelu)
          gw = modrelu_backward(cplx_mul(gf, x), gw, p.bias ? bias[h * p.bins + f] : 0.0f, &gb);
        const Complex share = cplx_mul(gw, cplx_conj(x));
        const int64_t o = line * p.bins + f;
        part_gate[2 * o] = share.re;
        part_gate[2 * o + 1] = share.im;
        if (p.bias) part_bias[o] = gb;
        v = cplx_mul(gw, cplx_conj(gf));
      }
      dx_hat[i] = v;
    }
    sync_threads();
    shared_ptr<Complex> dx = line_dft<true>(l, dx_hat, data);
    for (int64_t i = thread_idx().x; i < points; i += block_dim().x) {
      const int64_t line = first + (i >> q.log2m), t = i & mask;
      if (line >= lines || t >= n) continue;
      const int64_t b = line / p.channels, c = line % p.channels;
      out[(b * n + t) * p.channels + c] = E::from_float(Complex(dx[i]).re);
    }
    sync_threads();
  }
}

// d_gate[b, h, f] = the sum over the head's channels of their shares, in channel order; then
// d_bias[h, f] = the sum over the batch and the head's channels. One thread per element.
TM_DEVICE void spectral_gate_reduce_body(const SpectralGateParams& p) {
  const int64_t d = p.channels / p.heads, gates = p.batch * p.heads * p.bins;
  const global_ptr<const float> part_gate(p.part_gate), part_bias(p.part_bias);
  for (int64_t i = grid_thread(); i < gates + (p.bias ? p.heads * p.bins : 0);
       i += grid_threads()) {
    if (i < gates) {
      const int64_t f = i % p.bins, bh = i / p.bins;  // bh = b * heads + h
      const int64_t b = bh / p.heads, h = bh % p.heads;
      Complex sum{0.0f, 0.0f};
      for (int64_t j = 0; j < d; ++j) {
        const int64_t o = 2 * ((b * p.channels + h * d + j) * p.bins + f);
        sum = cplx_add(sum, Complex{part_gate[o], part_gate[o + 1]});
      }
      global_ptr<float>(p.grad_gate)[2 * i] = sum.re;
      global_ptr<float>(p.grad_gate)[2 * i + 1] = sum.im;
    } else {
      const int64_t k = i - gates, f = k % p.bins, h = k / p.bins;
      float sum = 0.0f;
      for (int64_t b = 0; b < p.batch; ++b)
        for (int64_t j = 0; j < d; ++j) sum += part_bias[(b * p.channels + h * d + j) * p.bins + f];
      global_ptr<float>(p.grad_bias)[k] = sum;
    }
  }
}

// ---- kernels

template <class E>
TM_GLOBAL void fft_line_pass_kernel(FftLinePassParams p) {
  fft_line_pass_body<E>(p);
}
TM_GLOBAL void fft_filter_grad_kernel(FilterGradParams p) {
  fft_filter_grad_body(p);
}
template <class E>
TM_GLOBAL void spectral_gate_forward_kernel(SpectralGateParams p) {
  spectral_gate_forward_body<E>(p);
}
template <class E>
TM_GLOBAL void spectral_gate_backward_kernel(SpectralGateParams p) {
  spectral_gate_backward_body<E>(p);
}
TM_GLOBAL void spectral_gate_reduce_kernel(SpectralGateParams p) {
  spectral_gate_reduce_body(p);
}

}  // namespace tokenmix::cuda
