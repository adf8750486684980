// The in-block FFTs of the CUDA FFT-mixing kernels, on the SIMT layer: one thread block transforms
// one complex signal of n = 2^log2n points held in shared memory (float32 storage).
//
// Two plans (FftPlan):
// - radix-2 Stockham on FMAs, natural order in and out: float32 inputs, and transforms too short
//   for a tensor-core tile (n < 128);
// - Monarch on tensor cores (fp16/bf16 inputs, n >= 128): n = 16^a * r, r in {1, 2, 4, 8}. The
//   forward is a decimation in frequency: a stages that each multiply every [16 x m] block of the
//   signal by the 16-point DFT matrix (mma.sync m16n8k16, fp16 operands, fp32 accumulation; the
//   signal's columns are the mma's N) and then by the twiddles W_{16m}^{row * col}, and a last
//   radix-r stage on FMAs. The spectrum comes out digit-reversed (FftPlan::position_of); the
//   inverse runs the stages backwards, conjugated, from that order back to natural order, so a
//   convolution never reorders anything.
//   Accuracy: the operands are fp16 even for bf16 inputs (3 more mantissa bits). Before its first
//   tensor-core stage each transform scales the signal by a power of two so that its largest
//   component lies in [0.5, 1), and each stage uses F16 / 4 (unitary), which grows a component
//   by at most 4 sqrt(2): stage inputs stay far inside fp16's range whatever the data's
//   magnitude, and small components keep their precision relative to the largest. The scale is
//   undone exactly after the last stage. Transforms are sigma = 4^-a times the unnormalized
//   DFTs.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/grid_stride.h"
#include "tokenmix/simt/simt.h"

namespace tokenmix::cuda {

using namespace ::tokenmix::simt;

// Threads per block of every FFT-mixing kernel.
inline constexpr int kFftConvThreads = 256;

struct Complex {
  float re, im;
};
TM_DEVICE Complex cplx_add(Complex a, Complex b) {
  return {a.re + b.re, a.im + b.im};
}
TM_DEVICE Complex cplx_sub(Complex a, Complex b) {
  return {a.re - b.re, a.im - b.im};
}
TM_DEVICE Complex cplx_mul(Complex a, Complex b) {
  return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}
TM_DEVICE Complex cplx_conj(Complex a) {
  return {a.re, -a.im};
}
TM_DEVICE Complex cplx_scale(Complex a, float s) {
  return {a.re * s, a.im * s};
}

// Which algorithm transforms n = 2^log2n points, and the order and scale of its spectrum.
struct FftPlan {
  int64_t n = 1;
  int log2n = 0;
  int radix16 = 0;     // tensor-core stages (0: the radix-2 FMA plan)
  int log2r = 0;       // the last stage's radix r = n / 16^radix16, as log2
  float sigma = 1.0f;  // transforms are sigma times the unnormalized DFTs

  TM_HOST_DEVICE bool monarch() const { return radix16 > 0; }
  // Where frequency f sits in the spectrum (digit-reversed under Monarch), and the inverse map.
  TM_HOST_DEVICE int64_t position_of(int64_t f) const {
    if (!monarch()) return f;
    int64_t p = f >> (4 * radix16);  // the radix-r digit
    for (int j = 0; j < radix16; ++j) p |= ((f >> (4 * j)) & 15) << (log2n - 4 * (j + 1));
    return p;
  }
  TM_HOST_DEVICE int64_t frequency_at(int64_t p) const {
    if (!monarch()) return p;
    int64_t f = (p & ((int64_t(1) << log2r) - 1)) << (4 * radix16);
    for (int j = 0; j < radix16; ++j) f |= ((p >> (log2n - 4 * (j + 1))) & 15) << (4 * j);
    return f;
  }
  // The position of frequency -f, for the f at position p.
  TM_HOST_DEVICE int64_t partner(int64_t p) const {
    return position_of((n - frequency_at(p)) & (n - 1));
  }
};

// Tensor-core (Monarch) plans start at one full 8-column tile of 16-point columns.
inline constexpr int kMonarchMinLog2 = 7;

TM_HOST_DEVICE FftPlan fft_plan(int64_t n, int log2n, bool tensor_cores) {
  FftPlan q;
  q.n = n;
  q.log2n = log2n;
  if (tensor_cores && log2n >= kMonarchMinLog2) {
    q.radix16 = log2n / 4;
    q.log2r = log2n % 4;
    q.sigma = 1.0f / float(int64_t(1) << (2 * q.radix16));
  }
  return q;
}

// A block's shared memory: a 32-float scratch (block reductions), the twiddle table of its
// transform length n (n/2 entries), then `buffers` complex buffers of `points` entries each
// (n, or several transforms of n points side by side).
inline constexpr int kFftScratchFloats = 32;
TM_HOST_DEVICE int64_t fft_smem_bytes(int64_t n, int buffers, int64_t points) {
  return kFftScratchFloats * 4 + (n / 2 + int64_t(buffers) * points) * int64_t(sizeof(Complex));
}
TM_HOST_DEVICE int64_t fft_smem_bytes(int64_t n, int buffers) {
  return fft_smem_bytes(n, buffers, n);
}

struct FftConvSmem {
  shared_ptr<float> scratch;
  shared_ptr<Complex> twiddle;  // [n/2] e^{-2 pi i t / n}
  int64_t n, points;
  TM_DEVICE shared_ptr<Complex> buf(int i) const { return twiddle + n / 2 + int64_t(i) * points; }
};

TM_DEVICE FftConvSmem fft_block_smem(int64_t n, int64_t points) {
  FftConvSmem s;
  s.scratch = dynamic_shared<float>();
  s.twiddle = ptr_cast<Complex>(s.scratch + kFftScratchFloats);
  s.n = n;
  s.points = points;
  return s;
}
TM_DEVICE FftConvSmem fft_conv_smem(int64_t n) {
  return fft_block_smem(n, n);
}

TM_DEVICE void fill_twiddles(const FftConvSmem& s, int64_t n) {
  for (int64_t t = thread_idx().x; t < n / 2; t += block_dim().x) {
    float sn, cs;
    sincospi_f32(-2.0f * float(t) / float(n), &sn, &cs);
    Complex w;
    w.re = cs;
    w.im = sn;
    s.twiddle[t] = w;
  }
}

// e^{-2 pi i idx / n} for 0 <= idx < n, from the half-circle table.
TM_DEVICE Complex twiddle_at(const FftConvSmem& s, int64_t idx) {
  const int64_t half = s.n / 2;
  if (idx < half) return s.twiddle[idx];
  const Complex w = s.twiddle[idx - half];
  return {-w.re, -w.im};
}

// Unnormalized radix-2 Stockham transforms of n = 2^log2n points each, `count` of them side by
// side in `data` (forward e^{-2 pi i}, inverse e^{+2 pi i}); `work` is clobbered. Returns
// whichever buffer holds the results.
template <bool kInverse>
TM_DEVICE shared_ptr<Complex> stockham_radix2(const FftConvSmem& s, int64_t n, int log2n,
                                              shared_ptr<Complex> data, shared_ptr<Complex> work,
                                              int64_t count = 1) {
  shared_ptr<Complex> src = data, dst = work;
  for (int stage = 0; stage < log2n; ++stage) {
    const int log2s = stage;  // s = 2^stage transforms interleaved, each of n / s points
    const int64_t half = n >> 1;
    for (int64_t i = thread_idx().x; i < count * half; i += block_dim().x) {
      const int64_t base = (i >> (log2n - 1)) << log2n, ih = i & (half - 1);
      const int64_t j = ih >> log2s, q = ih & ((int64_t(1) << log2s) - 1);
      const int64_t s_len = int64_t(1) << log2s;
      const Complex a0 = src[base + q + s_len * j];
      const Complex a1 = src[base + q + s_len * j + half];
      Complex w = s.twiddle[j * s_len];
      if (kInverse) w.im = -w.im;
      dst[base + q + s_len * 2 * j] = cplx_add(a0, a1);
      dst[base + q + s_len * (2 * j + 1)] = cplx_mul(cplx_sub(a0, a1), w);
    }
    sync_threads();
    shared_ptr<Complex> t = src;
    src = dst;
    dst = t;
  }
  return src;
}

// The largest |re| or |im| of n points (every thread gets it). NaN entries are ignored; an inf
// makes the result inf.
TM_DEVICE float block_max_abs(const FftConvSmem& s, const shared_ptr<Complex>& data, int64_t n) {
  float m = 0.0f;
  for (int64_t i = thread_idx().x; i < n; i += block_dim().x) {
    const Complex v = data[i];
    const float a = v.re < 0.0f ? -v.re : v.re, b = v.im < 0.0f ? -v.im : v.im;
    m = a > m ? a : m;
    m = b > m ? b : m;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float o = shfl_xor_sync(0xffffffffu, m, offset);
    m = o > m ? o : m;
  }
  if (lane_id() == 0) s.scratch[warp_id()] = m;
  sync_threads();
  float r = 0.0f;
  for (uint32_t w = 0; w < block_dim().x / 32; ++w) {
    const float o = s.scratch[w];
    r = o > r ? o : r;
  }
  sync_threads();  // the scratch is reused by the next reduction
  return r;
}

// The power of two that brings `max_abs` into [0.5, 1); 1 for 0 and non-finite values (which the
// transform then propagates as the FMA plan would). Clamped to the normal float32 powers: a
// maximum of 2^126 or more lands in [1, 4) (still far inside fp16's range), and a float32
// subnormal maximum (below 2^-126, which only bf16 or float32 data can have) stays small and
// loses precision in the fp16 operands.
TM_HOST_DEVICE float pow2_normalizer(float max_abs) {
  const int exponent = int((float_bits(max_abs) >> 23) & 0xffu);
  if (max_abs == 0.0f || exponent == 0xff) return 1.0f;
  int field = 253 - exponent;  // 2^(126 - e): biased exponent field of the scale
  field = field < 1 ? 1 : (field > 254 ? 254 : field);
  return bits_float(uint32_t(field) << 23);
}

struct Dft16Fragments {
  uint32_t re[4], im[4], neg_im[4];
};

// The A fragments of F16 / 4 (F16[j][k] = e^{-2 pi i jk / 16}; conjugated for the inverse) for
// this lane: real part, imaginary part and its negation, fp16 pairs. The roots come from the
// block's twiddle table (W_16^q = W_n^(q n / 16)).
template <bool kInverse>
TM_DEVICE Dft16Fragments dft16_fragments(const FftConvSmem& s) {
  const int lane = int(lane_id());
  Dft16Fragments f;
  TM_UNROLL
  for (int reg = 0; reg < 4; ++reg) {
    uint16_t re[2], im[2], neg[2];
    TM_UNROLL
    for (int h = 0; h < 2; ++h) {
      const layout::coord c = layout::mma_m16n8k16_a(lane, 2 * reg + h);
      const Complex w = twiddle_at(s, int64_t((c.row * c.col) & 15) * (s.n / 16));
      const float sn = kInverse ? -w.im : w.im;
      re[h] = f32_to_f16_bits(0.25f * w.re);
      im[h] = f32_to_f16_bits(0.25f * sn);
      neg[h] = f32_to_f16_bits(-0.25f * sn);
    }
    f.re[reg] = pack_b16x2(re[0], re[1]);
    f.im[reg] = pack_b16x2(im[0], im[1]);
    f.neg_im[reg] = pack_b16x2(neg[0], neg[1]);
  }
  return f;
}

// One tensor-core stage of `count` transforms of n = 2^log2n points side by side: the points are
// blocks [16 rows][m = 2^log2m columns]; each block
// becomes (F16 / 4) X, times the twiddles W_{16m}^{row * col} (forward), or (conj F16 / 4) times
// the conjugated twiddles applied first (inverse). Inputs are multiplied by in_scale before their
// rounding to fp16, outputs by out_scale. Columns of all blocks are numbered together and a warp
// takes 8 at a time, in place: only that warp reads or writes those columns' elements.
template <bool kInverse>
TM_DEVICE void radix16_stage(const FftConvSmem& s, int log2n, int log2m,
                             const shared_ptr<Complex>& data, int64_t count,
                             const Dft16Fragments& f, float in_scale, float out_scale) {
  const int lane = int(lane_id());
  const int64_t m_mask = (int64_t(1) << log2m) - 1;
  const int tw_shift = log2n - 4 - log2m;  // W_{16m}^j = W_n^(j << tw_shift)
  const int64_t tiles = (count << log2n) >> 7;
  const int64_t warps = int64_t(block_dim().x / 32);
  // Element (row, column) of the signal viewed as [16 x n/16] blocks side by side.
  auto index = [&](int row, int64_t col) {
    return ((col >> log2m) << (log2m + 4)) + (int64_t(row) << log2m) + (col & m_mask);
  };
  for (int64_t tile = warp_id(); tile < tiles; tile += warps) {
    uint32_t xr[2], xi[2];
    TM_UNROLL
    for (int reg = 0; reg < 2; ++reg) {
      float re[2], im[2];
      TM_UNROLL
      for (int h = 0; h < 2; ++h) {
        const layout::coord b = layout::mma_m16n8k16_b(lane, 2 * reg + h);
        const int64_t col = tile * 8 + b.col;
        Complex v = data[index(b.row, col)];
        if (kInverse)
          v = cplx_mul(v, cplx_conj(twiddle_at(s, ((col & m_mask) * b.row) << tw_shift)));
        re[h] = v.re * in_scale;
        im[h] = v.im * in_scale;
      }
      xr[reg] = pack_b16x2(f32_to_f16_bits(re[0]), f32_to_f16_bits(re[1]));
      xi[reg] = pack_b16x2(f32_to_f16_bits(im[0]), f32_to_f16_bits(im[1]));
    }
    float yr[4] = {0.0f, 0.0f, 0.0f, 0.0f}, yi[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_m16n8k16_f16f32(yr, f.re, xr, yr);
    mma_m16n8k16_f16f32(yr, f.neg_im, xi, yr);
    mma_m16n8k16_f16f32(yi, f.im, xr, yi);
    mma_m16n8k16_f16f32(yi, f.re, xi, yi);
    sync_warp();  // every lane has read its operands before any lane overwrites them
    TM_UNROLL
    for (int i = 0; i < 4; ++i) {
      const layout::coord c = layout::mma_m16n8k16_c(lane, i);
      const int64_t col = tile * 8 + c.col;
      Complex v = {yr[i], yi[i]};
      if (!kInverse) v = cplx_mul(v, twiddle_at(s, ((col & m_mask) * c.row) << tw_shift));
      data[index(c.row, col)] = cplx_scale(v, out_scale);
    }
  }
}

// The radix-R stage on blocks of R consecutive points (the forward's last stage, the inverse's
// first; no twiddles), R-point DFTs on FMAs.
template <int R, bool kInverse>
TM_DEVICE void radix_small_stage(const FftConvSmem& s, int64_t n, const shared_ptr<Complex>& data,
                                 int64_t count) {
  Complex w[R];
  TM_UNROLL
  for (int q = 0; q < R; ++q) {
    w[q] = twiddle_at(s, q * (n / R));
    if (kInverse) w[q] = cplx_conj(w[q]);
  }
  for (int64_t blk = thread_idx().x; blk < count * n / R; blk += block_dim().x) {
    Complex x[R];
    TM_UNROLL
    for (int j = 0; j < R; ++j) x[j] = data[blk * R + j];
    TM_UNROLL
    for (int k = 0; k < R; ++k) {
      Complex acc = x[0];
      TM_UNROLL
      for (int j = 1; j < R; ++j) acc = cplx_add(acc, cplx_mul(x[j], w[(j * k) % R]));
      data[blk * R + k] = acc;
    }
  }
  sync_threads();
}

template <bool kInverse>
TM_DEVICE void radix_small(const FftConvSmem& s, const FftPlan& q, const shared_ptr<Complex>& data,
                           int64_t count) {
  switch (q.log2r) {
    case 1: return radix_small_stage<2, kInverse>(s, q.n, data, count);
    case 2: return radix_small_stage<4, kInverse>(s, q.n, data, count);
    case 3: return radix_small_stage<8, kInverse>(s, q.n, data, count);
    default: return;
  }
}

// The Monarch transforms in place of `count` signals side by side (forward: natural order ->
// position_of order; inverse: back). One normalization serves all of them.
template <bool kInverse>
TM_DEVICE void monarch_transform(const FftConvSmem& s, const FftPlan& q,
                                 const shared_ptr<Complex>& data, int64_t count) {
  if (kInverse) radix_small<true>(s, q, data, count);
  const float scale = pow2_normalizer(block_max_abs(s, data, count * q.n));
  const Dft16Fragments f = dft16_fragments<kInverse>(s);
  for (int j = 0; j < q.radix16; ++j) {
    const int stage = kInverse ? q.radix16 - 1 - j : j;
    radix16_stage<kInverse>(s, q.log2n, q.log2n - 4 * (stage + 1), data, count, f,
                            j == 0 ? scale : 1.0f, j == q.radix16 - 1 ? 1.0f / scale : 1.0f);
    sync_threads();
  }
  if (!kInverse) radix_small<false>(s, q, data, count);
}

// The plan's transforms of `count` signals of q.n points side by side in `data` (`work` may be
// clobbered); returns the buffer holding the results.
template <bool kInverse>
TM_DEVICE shared_ptr<Complex> transform(const FftConvSmem& s, const FftPlan& q,
                                        shared_ptr<Complex> data, shared_ptr<Complex> work,
                                        int64_t count = 1) {
  if (q.monarch()) {
    monarch_transform<kInverse>(s, q, data, count);
    return data;
  }
  return stockham_radix2<kInverse>(s, q.n, q.log2n, data, work, count);
}

}  // namespace tokenmix::cuda
