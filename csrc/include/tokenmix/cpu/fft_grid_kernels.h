// Fused 2-D FFT mixing on the CPU.
//
// global_filter: per (batch entry, block of channels), the whole [H, W] grid of one block stays
// in per-task scratch: rfft of each row, FFT of each column, times the weight, inverse FFT of
// each column, irfft of each row. Its adjoint in x is the same filter with conj(weight); the
// weight's gradient is c_f * sum_b G conj(X) / (H W), with X, G the unnormalized spectra of x
// and dy and c_f = 1 at the columns a real inverse transform counts once (0, and W/2 for even
// W), else 2.
//
// fourier_mix: Re(FFT_tokens(FFT_channels(x))). The map is a real symmetric matrix (entries
// cos(2 pi (k1 n1 / L + k2 n2 / C))), so it is its own adjoint. Per batch entry: rfft over
// tokens for blocks of channels into a [L/2+1, C] spectrum (stored blocked by rows), then FFT
// over channels in place for blocks of frequency rows (one lane per row);
// Re X[L - k1, C - k2] = Re X[k1, k2] fills the rest.
#pragma once

#include <cstdint>

#include "tokenmix/cpu/fft_engine.h"
#include "tokenmix/cpu/fft_io.h"
#include "tokenmix/cpu/fft_tasks.h"
#include "tokenmix/cpu/parallel.h"
#include "tokenmix/fft_problem.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

template <class S, class T>
void global_filter_cpu_impl(const GlobalFilterProblem& p, bool backward) {
  using V = typename Simd<T>::V;
  using CV = CVec<T>;
  constexpr int W = Simd<T>::kWidth;
  const int64_t B = p.batch, H = p.height, Wd = p.width, C = p.channels;
  RealFftPlan<T> row_plan;
  row_plan.init(Wd);
  FftPlan<T> col_plan;
  col_plan.init(H);
  const int64_t wf = row_plan.bins();
  const BlockChunking chunking(
      B, C, W, backward ? BlockChunking::kBackwardTasks : BlockChunking::kForwardTasks);
  const bool partials = backward && chunking.chunks > 1;
  Buffer<T> dw_part;
  if (partials) dw_part.assign(size_t(chunking.chunks * H * wf * C * 2), T(0));
  const T inv_area = T(1) / T(H * Wd);
  const T* weight = static_cast<const T*>(p.weight);

  run_parallel(p, chunking.tasks(), 1, [&](int64_t task0, int64_t task1) {
    Buffer<V> signal;
    Buffer<CV> row_work, col, col_work, xs, ds, dw;
    signal.allocate(size_t(row_plan.signal_elems()));
    row_work.allocate(size_t(row_plan.work_elems()));
    col.allocate(size_t(H));
    col_work.allocate(size_t(col_plan.work_elems()));
    xs.allocate(size_t(H * wf));
    if (backward) {
      ds.allocate(size_t(H * wf));
      dw.allocate(size_t(H * wf));
    }
    for (int64_t task = task0; task < task1; ++task) {
      const BlockChunking::Task tk = chunking.task(task);
      // Plain copies: lambdas below capture them (C++17 lambdas cannot capture bindings).
      const int64_t chunk = tk.chunk, c0 = tk.c0, b0 = tk.b0, b1 = tk.b1;
      const int lanes = tk.lanes;
      auto weight_at = [&](int64_t h, int64_t f) {
        const T* w = weight + ((h * wf + f) * C + c0) * 2;
        return CV{load_lanes<T, T>(w, 2, lanes), load_lanes<T, T>(w + 1, 2, lanes)};
      };
      // spec = the unnormalized 2-D half spectrum of src[b] (rows, then columns).
      auto forward2d = [&](const FftTensor& src, int64_t b, CV* spec) {
        for (int64_t h = 0; h < H; ++h) {
          const ChannelBlock<S> x(src.data,
                                  b * src.stride[0] + h * src.stride[1] + c0 * src.stride[3],
                                  src.stride[2], src.stride[3]);
          for (int64_t w = 0; w < Wd; ++w) signal[w] = x.template load<T>(w, lanes);
          rfft(row_plan, signal.data(), row_work.data(), spec + h * wf);
        }
        for (int64_t f = 0; f < wf; ++f) {
          for (int64_t h = 0; h < H; ++h) col[h] = spec[h * wf + f];
          fft_transform<T, false>(col_plan, col.data(), col_work.data());
          for (int64_t h = 0; h < H; ++h) spec[h * wf + f] = col[h];
        }
      };
      // out[b] = the inverse of spec * (conj) weight / (H W).
      auto filter_inverse2d = [&](CV* spec, bool conjugate, S* out) {
        for (int64_t f = 0; f < wf; ++f) {
          for (int64_t h = 0; h < H; ++h) {
            const CV w = weight_at(h, f);
            const CV z = conjugate ? cmul_conj(spec[h * wf + f], w) : cmul(spec[h * wf + f], w);
            col[h] = {z.re * inv_area, z.im * inv_area};
          }
          fft_transform<T, true>(col_plan, col.data(), col_work.data());
          for (int64_t h = 0; h < H; ++h) spec[h * wf + f] = col[h];
        }
        const OutputRows<S> rows{out, C};
        for (int64_t h = 0; h < H; ++h) {
          irfft(row_plan, spec + h * wf, signal.data(), row_work.data());
          for (int64_t w = 0; w < Wd; ++w) rows.template store<T>(h * Wd + w, signal[w], lanes);
        }
      };
      if (backward)
        for (int64_t i = 0; i < H * wf; ++i) dw[i] = czero<T>();
      for (int64_t b = b0; b < b1; ++b) {
        S* out = static_cast<S*>(backward ? p.grad_x : p.out) + b * H * Wd * C + c0;
        if (!backward) {
          forward2d(p.x, b, xs.data());
          filter_inverse2d(xs.data(), false, out);
          continue;
        }
        forward2d(p.x, b, xs.data());
        forward2d(p.grad_out, b, ds.data());
        for (int64_t i = 0; i < H * wf; ++i) dw[i] = cadd(dw[i], cmul_conj(ds[i], xs[i]));
        filter_inverse2d(ds.data(), true, out);
      }
      if (!backward) continue;
      T* dst = partials ? dw_part.data() + chunk * H * wf * C * 2 : static_cast<T*>(p.grad_weight);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t f = 0; f < wf; ++f) {
          const T count = (f == 0 || 2 * f == Wd) ? T(1) : T(2);
          const CV v = dw[h * wf + f];
          T* o = dst + ((h * wf + f) * C + c0) * 2;
          for (int l = 0; l < lanes; ++l) {
            o[2 * l] = v.re[l] * count * inv_area;
            o[2 * l + 1] = v.im[l] * count * inv_area;
          }
        }
    }
  });
  if (!partials) return;
  T* dst = static_cast<T*>(p.grad_weight);
  add_chunk_partials(p, dw_part.data(), chunking.chunks, H * wf * C * 2,
                     [&](int64_t i, T v) { dst[i] = v; });
}

template <class S, class T>
void fourier_mix_cpu_impl(const FourierMixProblem& p) {
  using V = typename Simd<T>::V;
  using CV = CVec<T>;
  constexpr int W = Simd<T>::kWidth;
  const int64_t B = p.batch, L = p.length, C = p.channels;
  RealFftPlan<T> token_plan;
  token_plan.init(L);
  FftPlan<T> channel_plan;
  channel_plan.init(C);
  const int64_t lf = token_plan.bins();
  const int64_t channel_blocks = (C + W - 1) / W, row_blocks = (lf + W - 1) / W;
  // One batch entry's token spectrum, blocked for the channel transforms: vector
  // spectrum[rb * C + c] holds channel c of frequency rows rb * W ... rb * W + W - 1, one per
  // lane, so each block of rows is a contiguous transform input.
  Buffer<CV> spectrum;
  spectrum.assign(size_t(row_blocks * C), czero<T>());
  for (int64_t b = 0; b < B; ++b) {
    run_parallel(p, channel_blocks, 1, [&](int64_t blk0, int64_t blk1) {
      Buffer<V> signal;
      Buffer<CV> work, spec;
      signal.allocate(size_t(token_plan.signal_elems()));
      work.allocate(size_t(token_plan.work_elems()));
      spec.allocate(size_t(lf));
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t c0 = blk * W;
        const int lanes = int(C - c0 < W ? C - c0 : W);
        const ChannelBlock<S> x(p.x.data, b * p.x.stride[0] + c0 * p.x.stride[2], p.x.stride[1],
                                p.x.stride[2]);
        for (int64_t t = 0; t < L; ++t) signal[t] = x.template load<T>(t, lanes);
        rfft(token_plan, signal.data(), work.data(), spec.data());
        for (int64_t f = 0; f < lf; ++f) {
          CV* row = spectrum.data() + (f / W) * C + c0;
          const int lane = int(f % W);
          for (int l = 0; l < lanes; ++l) {
            row[l].re[lane] = spec[f].re[l];
            row[l].im[lane] = spec[f].im[l];
          }
        }
      }
    });
    S* out = static_cast<S*>(p.out) + b * L * C;
    run_parallel(p, row_blocks, 1, [&](int64_t blk0, int64_t blk1) {
      Buffer<CV> work;
      work.allocate(size_t(channel_plan.work_elems()));
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t f0 = blk * W;
        const int lanes = int(lf - f0 < W ? lf - f0 : W);
        CV* z = spectrum.data() + blk * C;
        fft_transform<T, false>(channel_plan, z, work.data());
        for (int l = 0; l < lanes; ++l) {
          const int64_t k1 = f0 + l, mirror = (L - k1) % L;
          for (int64_t c = 0; c < C; ++c) {
            const T value = z[c].re[l];
            out[k1 * C + c] = from_float<S>(value);
            if (mirror != k1) out[mirror * C + (C - c) % C] = from_float<S>(value);
          }
        }
      }
    });
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
