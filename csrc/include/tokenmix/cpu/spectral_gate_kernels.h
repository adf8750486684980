// Fused spectral_gate on the CPU: per (batch entry, head) and block of the head's channels,
// rfft over tokens -> complex gate (one per frequency, shared by the head's channels) ->
// optional modReLU -> irfft, in per-task scratch.
//
// Gradients (torch's convention for complex tensors: dL/dRe + i dL/dIm). With D = rfft(dy) / L
// and c_f = 1 at the bins a real inverse transform counts once (0, and L/2 for even L), else 2:
// the gradient reaching Z = act(gate * X) is c_f D; modReLU's backward is linear in it, so with
// gW its image of D: d_gate = c_f sum_channels gW conj(X), d_bias = c_f sum gb, and
// dx = irfft-unnormalized(gW conj(gate)).
#pragma once

#include <cmath>
#include <cstdint>

#include "tokenmix/cpu/fft_engine.h"
#include "tokenmix/cpu/fft_io.h"
#include "tokenmix/cpu/parallel.h"
#include "tokenmix/fft_problem.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

template <class T>
inline typename Simd<T>::V vsqrt_lanes(typename Simd<T>::V x) {
  for (int l = 0; l < Simd<T>::kWidth; ++l) x[l] = std::sqrt(x[l]);
  return x;
}

// modReLU: relu(|w| + bias) w / |w|, 0 where w == 0.
template <class T>
inline CVec<T> modrelu_forward(CVec<T> w, T bias) {
  using V = typename Simd<T>::V;
  const V s = vsqrt_lanes<T>(w.re * w.re + w.im * w.im);
  const V one = vbroadcast<V>(T(1));
  const V shifted = s + bias;
  const V factor = ((s > V{}) & (shifted > V{})) ? shifted / (s > V{} ? s : one) : V{};
  return {w.re * factor, w.im * factor};
}

// Backward of modReLU at w for the incoming gradient gz: returns gW, adds d_bias per lane.
template <class T>
inline CVec<T> modrelu_backward(CVec<T> w, CVec<T> gz, T bias, typename Simd<T>::V* gbias) {
  using V = typename Simd<T>::V;
  const V s = vsqrt_lanes<T>(w.re * w.re + w.im * w.im);
  const V one = vbroadcast<V>(T(1));
  const auto live = (s > V{}) & ((s + bias) > V{});
  const V safe = live ? s : one;
  const V proj = (gz.re * w.re + gz.im * w.im) / safe;  // Re(conj(gz) w) / s
  *gbias = *gbias + (live ? proj : V{});
  const V gain = one + bias / safe;
  const V radial = vbroadcast<V>(bias) * proj / (safe * safe);  // b Re(conj(gz) w) / s^3
  return {live ? gz.re * gain - radial * w.re : V{}, live ? gz.im * gain - radial * w.im : V{}};
}

template <class S, class T>
void spectral_gate_cpu_impl(const SpectralGateProblem& p, bool backward) {
  using V = typename Simd<T>::V;
  using CV = CVec<T>;
  constexpr int W = Simd<T>::kWidth;
  const int64_t B = p.batch, L = p.length, C = p.channels, heads = p.heads, d = C / heads;
  RealFftPlan<T> plan;
  plan.init(L);
  const int64_t bins = plan.bins();
  const int64_t blocks = (d + W - 1) / W;
  const T inv_l = T(1) / T(L);
  const T* gate = static_cast<const T*>(p.gate);
  const T* bias = static_cast<const T*>(p.bias);
  // d_bias per batch entry, added in batch order afterwards.
  Buffer<T> dbias_part;
  if (backward && bias) dbias_part.assign(size_t(B * heads * bins), T(0));

  run_parallel(p, B * heads, 1, [&](int64_t task0, int64_t task1) {
    Buffer<V> signal;
    Buffer<CV> work, spec, x_hat;
    Buffer<T> dgate;
    signal.allocate(size_t(plan.signal_elems()));
    work.allocate(size_t(plan.work_elems()));
    spec.allocate(size_t(bins));
    if (backward) {
      x_hat.allocate(size_t(bins));
      dgate.allocate(size_t(2 * bins));
    }
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const T* g = gate + (b * heads + h) * bins * 2;
      const T* bh = bias ? bias + h * bins : nullptr;
      T* dbias = backward && bias ? dbias_part.data() + (b * heads + h) * bins : nullptr;
      if (backward) fill(dgate.data(), dgate.data() + 2 * bins, T(0));
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t c0 = h * d + blk * W;
        const int lanes = int(d - blk * W < W ? d - blk * W : W);
        auto transform = [&](const FftTensor& src, CV* out) {
          const ChannelBlock<S> x(src.data, b * src.stride[0] + c0 * src.stride[2], src.stride[1],
                                  src.stride[2]);
          for (int64_t t = 0; t < L; ++t) signal[t] = x.template load<T>(t, lanes);
          rfft(plan, signal.data(), work.data(), out);
        };
        S* out = static_cast<S*>(backward ? p.grad_x : p.out) + b * L * C + c0;
        if (!backward) {
          transform(p.x, spec.data());
          for (int64_t f = 0; f < bins; ++f) {
            CV w = cmul_scalar(spec[f], g[2 * f], g[2 * f + 1]);
            if (p.modrelu) w = modrelu_forward(w, bh ? bh[f] : T(0));
            spec[f] = {w.re * inv_l, w.im * inv_l};
          }
        } else {
          transform(p.x, x_hat.data());
          transform(p.grad_out, spec.data());
          for (int64_t f = 0; f < bins; ++f) {
            const T count = (f == 0 || 2 * f == L) ? T(1) : T(2);
            const CV x = x_hat[f];
            CV gw = {spec[f].re * inv_l, spec[f].im * inv_l};
            if (p.modrelu) {
              V gb{};
              gw = modrelu_backward(cmul_scalar(x, g[2 * f], g[2 * f + 1]), gw, bh ? bh[f] : T(0),
                                    &gb);
              if (dbias) dbias[f] += count * hsum<T>(gb);
            }
            const CV prod = cmul_conj(gw, x);
            dgate[2 * f] += count * hsum<T>(prod.re);
            dgate[2 * f + 1] += count * hsum<T>(prod.im);
            spec[f] = cmul_scalar(gw, g[2 * f], -g[2 * f + 1]);
          }
        }
        irfft(plan, spec.data(), signal.data(), work.data());
        const OutputRows<S> rows{out, C};
        for (int64_t t = 0; t < L; ++t) rows.template store<T>(t, signal[t], lanes);
      }
      if (backward) {
        T* dg = static_cast<T*>(p.grad_gate) + (b * heads + h) * bins * 2;
        for (int64_t i = 0; i < 2 * bins; ++i) dg[i] = dgate[i];
      }
    }
  });
  if (!(backward && bias)) return;
  T* dbias = static_cast<T*>(p.grad_bias);
  for (int64_t i = 0; i < heads * bins; ++i) {
    T total = 0;
    for (int64_t b = 0; b < B; ++b) total += dbias_part[size_t(b * heads * bins + i)];
    dbias[i] = total;
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
