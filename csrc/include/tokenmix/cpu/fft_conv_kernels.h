// Fused fft_conv on the CPU: per block of channels (one lane each), the filter's transform, then
// per batch entry transform -> product -> inverse transform -> gates and skip, all in per-task
// scratch of a few transform lengths. Nothing of size B x L x C exists but the outputs.
//
// Backward, with v = pre_gate * u and g = post_gate * dy:
//   dv = corr(g, k), du = pre_gate * dv + bias * dy, d_pre_gate = u * dv,
//   d_post_gate = dy * (k (*) v), dk = sum_b corr(g, v), d_bias = sum_{b,t} dy * u.
// Tasks are (channel block, batch chunk); the chunking depends on the shape only, and the
// chunks' partial dk / d_bias are added in chunk order, so results do not depend on threads.
#pragma once

#include <cstdint>

#include "tokenmix/cpu/fft_engine.h"
#include "tokenmix/cpu/fft_io.h"
#include "tokenmix/cpu/fft_tasks.h"
#include "tokenmix/cpu/parallel.h"
#include "tokenmix/fft_problem.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

template <class S, class T>
void fft_conv_cpu_impl(const FftConvProblem& p, bool backward) {
  using V = typename Simd<T>::V;
  using CV = CVec<T>;
  constexpr int W = Simd<T>::kWidth;
  const int64_t B = p.batch, L = p.length, C = p.channels, Lk = p.filter_length;
  const int64_t n = fft_conv_size(L, Lk, p.causal);
  RealFftPlan<T> plan;
  plan.init(n);
  const int64_t bins = plan.bins();
  const BlockChunking chunking(
      B, C, W, backward ? BlockChunking::kBackwardTasks : BlockChunking::kForwardTasks);
  // Partial dk / d_bias per chunk, in the compute type, when there is more than one chunk.
  const bool partials = backward && chunking.chunks > 1;
  Buffer<T> dk_part, dbias_part;
  if (partials) {
    dk_part.assign(size_t(chunking.chunks * C * Lk), T(0));
    if (p.bias.data) dbias_part.assign(size_t(chunking.chunks * C), T(0));
  }
  const T inv_n = T(1) / T(n);

  run_parallel(p, chunking.tasks(), 1, [&](int64_t task0, int64_t task1) {
    Buffer<V> signal;
    Buffer<CV> work, k_hat, spec, v_hat, dk_hat;
    signal.allocate(size_t(plan.signal_elems()));
    work.allocate(size_t(plan.work_elems()));
    k_hat.allocate(size_t(bins));
    spec.allocate(size_t(bins));
    if (backward) {
      v_hat.allocate(size_t(bins));
      dk_hat.allocate(size_t(bins));
    }
    for (int64_t task = task0; task < task1; ++task) {
      const BlockChunking::Task tk = chunking.task(task);
      // Plain copies: lambdas below capture them (C++17 lambdas cannot capture bindings).
      const int64_t chunk = tk.chunk, c0 = tk.c0, b0 = tk.b0, b1 = tk.b1;
      const int lanes = tk.lanes;

      // The filter's transform, with the inverse transform's 1/n folded in.
      load_channel_rows<T>(
          static_cast<const char*>(p.k.data) + c0 * p.k.stride[0] * dtype_size(p.k.dtype),
          p.k.dtype, p.k.stride[0], p.k.stride[1], lanes, Lk, signal.data());
      for (int64_t t = Lk; t < n; ++t) signal[t] = V{};
      rfft(plan, signal.data(), work.data(), k_hat.data());
      for (int64_t f = 0; f < bins; ++f) k_hat[f] = {k_hat[f].re * inv_n, k_hat[f].im * inv_n};
      V bias{};
      for (int l = 0; l < lanes && p.bias.data; ++l)
        bias[l] = load_dynamic<T>(p.bias.data, p.bias.dtype, (c0 + l) * p.bias.stride[0]);

      auto block = [&](const FftTensor& x, int64_t b) {
        return ChannelBlock<S>(x.data, b * x.stride[0] + c0 * x.stride[2], x.stride[1],
                               x.stride[2]);
      };
      // signal[0..L) = u * pre_gate of batch entry b (zero-padded to n), then its transform.
      auto transform_v = [&](int64_t b, CV* out) {
        const ChannelBlock<S> u = block(p.u, b), pre = block(p.pre_gate, b);
        for (int64_t t = 0; t < L; ++t) {
          V x = u.template load<T>(t, lanes);
          if (pre) x = x * pre.template load<T>(t, lanes);
          signal[t] = x;
        }
        for (int64_t t = L; t < n; ++t) signal[t] = V{};
        rfft(plan, signal.data(), work.data(), out);
      };
      S* const out_base = static_cast<S*>(backward ? p.grad_u : p.out);
      if (backward) {
        for (int64_t f = 0; f < bins; ++f) dk_hat[f] = czero<T>();
      }
      V dbias{};

      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row0 = b * L * C + c0;  // contiguous outputs
        const ChannelBlock<S> u = block(p.u, b), pre = block(p.pre_gate, b),
                              post = block(p.post_gate, b);
        const OutputRows<S> out{out_base + row0, C};
        if (!backward) {
          transform_v(b, spec.data());
          for (int64_t f = 0; f < bins; ++f) spec[f] = cmul(spec[f], k_hat[f]);
          irfft(plan, spec.data(), signal.data(), work.data());
          for (int64_t t = 0; t < L; ++t) {
            V y = signal[t];
            if (post) y = y * post.template load<T>(t, lanes);
            if (p.bias.data) y = y + bias * u.template load<T>(t, lanes);
            out.template store<T>(t, y, lanes);
          }
          continue;
        }
        const ChannelBlock<S> dy = block(p.grad_out, b);
        transform_v(b, v_hat.data());
        if (post) {  // d_post_gate = dy * (k (*) v)
          for (int64_t f = 0; f < bins; ++f) spec[f] = cmul(v_hat[f], k_hat[f]);
          irfft(plan, spec.data(), signal.data(), work.data());
          const OutputRows<S> dpost{static_cast<S*>(p.grad_post_gate) + row0, C};
          for (int64_t t = 0; t < L; ++t)
            dpost.template store<T>(t, signal[t] * dy.template load<T>(t, lanes), lanes);
        }
        for (int64_t t = 0; t < L; ++t) {
          V g = dy.template load<T>(t, lanes);
          if (post) g = g * post.template load<T>(t, lanes);
          signal[t] = g;
        }
        for (int64_t t = L; t < n; ++t) signal[t] = V{};
        rfft(plan, signal.data(), work.data(), spec.data());
        for (int64_t f = 0; f < bins; ++f)
          dk_hat[f] = cadd(dk_hat[f], cmul_conj(spec[f], v_hat[f]));
        for (int64_t f = 0; f < bins; ++f) spec[f] = cmul_conj(spec[f], k_hat[f]);
        irfft(plan, spec.data(), signal.data(), work.data());  // signal[0..L) = dv
        const OutputRows<S> dpre{pre ? static_cast<S*>(p.grad_pre_gate) + row0 : nullptr, C};
        for (int64_t t = 0; t < L; ++t) {
          const V dv = signal[t];
          const V uu = u.template load<T>(t, lanes);
          V du = pre ? dv * pre.template load<T>(t, lanes) : dv;
          if (p.bias.data) {
            const V g = dy.template load<T>(t, lanes);
            du = du + bias * g;
            dbias = dbias + g * uu;
          }
          out.template store<T>(t, du, lanes);
          if (pre) dpre.template store<T>(t, dv * uu, lanes);
        }
      }
      if (!backward) continue;
      // dk = corr(g, v) summed over the chunk's batch entries: the first Lk taps.
      irfft(plan, dk_hat.data(), signal.data(), work.data());
      for (int64_t t = 0; t < Lk; ++t) {
        const V d = signal[t] * inv_n;
        for (int l = 0; l < lanes; ++l) {
          if (partials)
            dk_part[size_t((chunk * C + c0 + l) * Lk + t)] = d[l];
          else
            store_dynamic<T>(p.grad_k, p.k.dtype, (c0 + l) * Lk + t, d[l]);
        }
      }
      for (int l = 0; l < lanes && p.bias.data; ++l) {
        if (partials)
          dbias_part[size_t(chunk * C + c0 + l)] = dbias[l];
        else
          store_dynamic<T>(p.grad_bias, p.bias.dtype, c0 + l, dbias[l]);
      }
    }
  });

  if (!partials) return;
  add_chunk_partials(p, dk_part.data(), chunking.chunks, C * Lk,
                     [&](int64_t i, T v) { store_dynamic<T>(p.grad_k, p.k.dtype, i, v); });
  if (p.bias.data)
    add_chunk_partials(p, dbias_part.data(), chunking.chunks, C,
                       [&](int64_t i, T v) { store_dynamic<T>(p.grad_bias, p.bias.dtype, i, v); });
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
