// Host side of the CUDA fft_conv kernels (tokenmix/cuda/fft_conv.h, one kernel per direction,
// and the pass sequence of fft_conv_multipass.h): parameters, shared memory, the emulator's
// buffer registrations and the launches.
#pragma once

#include <stdexcept>
#include <string>

#include "tokenmix/cuda/fft_conv.h"
#include "tokenmix/cuda/fft_conv_multipass.h"
#include "tokenmix/cuda/fft_entry.h"
#include "tokenmix/cuda/fft_launch_common.h"

namespace tokenmix::cuda::fft_host {

inline FftConvParams make_params(const FftConvProblem& p) {
  const std::string why = fft_conv_unsupported_reason(p);
  if (!why.empty()) throw std::runtime_error(why);
  FftConvParams prm{};
  prm.batch = p.batch;
  prm.length = p.length;
  prm.channels = p.channels;
  prm.taps = p.filter_length;
  prm.n = fft_conv_cuda_size(p.length, p.filter_length, p.causal);
  prm.log2n = 0;
  while ((int64_t(1) << prm.log2n) < prm.n) ++prm.log2n;
  prm.fold = fft_conv_cuda_folds(p.length, p.filter_length, p.causal);
  prm.u = p.u.data;
  copy_strides(p.u, prm.u_stride, 3);
  prm.pre = p.pre_gate.data;
  copy_strides(p.pre_gate, prm.pre_stride, 3);
  prm.post = p.post_gate.data;
  copy_strides(p.post_gate, prm.post_stride, 3);
  prm.dy = p.grad_out.data;
  copy_strides(p.grad_out, prm.dy_stride, 3);
  prm.k = p.k.data;
  copy_strides(p.k, prm.k_stride, 2);
  prm.k_dtype = p.k.dtype;
  prm.bias = p.bias.data;
  prm.bias_stride = p.bias.stride[0];
  prm.bias_dtype = p.bias.dtype;
  prm.out = nullptr;
  prm.grad_pre = p.grad_pre_gate;
  prm.grad_post = p.grad_post_gate;
  prm.grad_k = p.grad_k;
  prm.grad_bias = p.grad_bias;
  prm.chunks = fft_conv_cuda_chunks(p.batch, p.channels);
  prm.batch_per_chunk = (p.batch + prm.chunks - 1) / prm.chunks;
  prm.partial_k = prm.chunks > 1 ? p.workspace : nullptr;
  prm.partial_bias =
      prm.chunks > 1 ? p.workspace + prm.chunks * p.channels * p.filter_length : nullptr;
  return prm;
}

// Every buffer a launch reads or writes, for the emulator's checks (no-op under nvcc).
inline void register_buffers(Registrations& r, const FftConvProblem& p, bool backward) {
  const int64_t blc[3] = {p.batch, p.length, p.channels};
  const int64_t ck[2] = {p.channels, p.filter_length};
  const int64_t c[1] = {p.channels};
  const size_t elem = size_t(dtype_size(p.dtype));
  const size_t outputs = size_t(p.batch * p.length * p.channels) * elem;
  r.add(p.u.data, extent_bytes(p.u, blc, 3), "u");
  r.add(p.pre_gate.data, extent_bytes(p.pre_gate, blc, 3), "pre_gate");
  r.add(p.post_gate.data, extent_bytes(p.post_gate, blc, 3), "post_gate");
  r.add(p.k.data, extent_bytes(p.k, ck, 2), "k");
  r.add(p.bias.data, extent_bytes(p.bias, c, 1), "bias");
  r.add(p.workspace,
        size_t(fft_conv_cuda_workspace_floats(p.batch, p.channels, p.length, p.filter_length,
                                              p.causal, backward)) *
            4,
        "workspace");
  if (!backward) {
    r.add(p.out, outputs, "out");
    return;
  }
  r.add(p.grad_out.data, extent_bytes(p.grad_out, blc, 3), "grad_out");
  r.add(p.grad_u, outputs, "grad_u");
  r.add(p.grad_pre_gate, p.pre_gate.data ? outputs : 0, "grad_pre_gate");
  r.add(p.grad_post_gate, p.post_gate.data ? outputs : 0, "grad_post_gate");
  r.add(p.grad_k, size_t(p.channels * p.filter_length) * size_t(dtype_size(p.k.dtype)), "grad_k");
  if (p.bias.data)
    r.add(p.grad_bias, size_t(p.channels) * size_t(dtype_size(p.bias.dtype)), "grad_bias");
}

// ---- multi-pass (tokenmix/cuda/fft_conv_multipass.h)

inline FftPassParams pass_params(const FftConvParams& prm) {
  FftPassParams q{};
  q.conv = prm;
  q.log2n1 = (prm.log2n + 1) / 2;
  q.log2n2 = prm.log2n - q.log2n1;
  return q;
}

// Selects the pair chunk starting at pair q0 of at most `chunk` pairs.
inline void select_pairs(FftPassParams& q, int64_t q0, int64_t chunk) {
  const int64_t pairs = (q.conv.channels + 1) / 2;
  q.q0 = q0;
  q.pairs = pairs - q0 < chunk ? pairs - q0 : chunk;
  const int64_t left = q.conv.channels - 2 * q0;
  q.chunk_channels = left < 2 * q.pairs ? left : 2 * q.pairs;
}

// Selects the batch chunk starting at entry b0 of at most `chunk` entries.
inline void select_entries(FftPassParams& q, int64_t b0, int64_t chunk, int64_t batch) {
  q.b0 = b0;
  q.entries = batch - b0 < chunk ? batch - b0 : chunk;
  q.signals = q.entries * q.pairs;
}

// The unnormalized DFT (or its conjugate) of q.signals rows of src into dst: the column pass in
// place, then the row pass.
template <bool kTensorCore, bool kInverse>
void pass_transform(FftPassParams q, float* src, float* dst, void* stream) {
  q.src = src;
  q.dst = dst;
  const int64_t n1 = int64_t(1) << q.log2n1, n2 = int64_t(1) << q.log2n2;
  const int64_t col_blocks = q.signals * (n2 / (kFftConvCudaBlockSize / n1));
  const int64_t row_blocks = q.signals * (n1 / (kFftConvCudaBlockSize / n2));
  launch_checked(fft_columns_kernel<kTensorCore, kInverse>, "fft_columns_kernel",
                 dim3u(uint32_t(col_blocks), 1, 1), fft_smem_bytes(n1, 2, kFftConvCudaBlockSize), q,
                 stream);
  launch_checked(fft_rows_kernel<kTensorCore, kInverse>, "fft_rows_kernel",
                 dim3u(uint32_t(row_blocks), 1, 1), fft_smem_bytes(n2, 2, kFftConvCudaBlockSize), q,
                 stream);
}

template <class E>
void pass_load(FftPassParams q, int mode, float* dst, void* stream) {
  q.mode = mode;
  q.src = dst;
  launch_checked(fft_load_kernel<E>, "fft_load_kernel", pointwise_grid(q.signals * q.conv.n), 0, q,
                 stream);
}

inline void pass_product(FftPassParams q, int mode, const float* src, const float* operand,
                         float* dst, bool accumulate, void* stream) {
  q.mode = mode;
  q.src = const_cast<float*>(src);
  q.operand = operand;
  q.dst = dst;
  q.accumulate = accumulate;
  const int64_t rows = mode == kProductCross ? q.pairs : q.signals;
  launch_checked(fft_product_kernel, "fft_product_kernel", pointwise_grid(rows * q.conv.n), 0, q,
                 stream);
}

// The filter spectra of the pair chunk (float32 plan) into spectrum, using scratch ([P, n] at
// least).
template <class E>
void pass_filter_spectrum(FftPassParams q, float* scratch, float* spectrum, void* stream) {
  select_entries(q, 0, 1, 1);
  pass_load<E>(q, 2, scratch, stream);
  pass_transform<false, false>(q, scratch, spectrum, stream);
}

// The multi-pass workspace (fft_conv_cuda_workspace_floats): `per_pair` complex buffers
// [pair_chunk, n], then complex buffers [chunk, pair_chunk, n].
struct PassWorkspace {
  int64_t n, pairs, pair_chunk, chunk;
  float* base;
  int per_pair;
  PassWorkspace(const FftConvParams& prm, int64_t batch, void* workspace, int per_pair_buffers)
      : n(prm.n),
        pairs((prm.channels + 1) / 2),
        pair_chunk(fft_conv_cuda_pair_chunk(prm.channels, prm.n)),
        chunk(fft_conv_cuda_batch_chunk(batch, pair_chunk, prm.n)),
        base(static_cast<float*>(workspace)),
        per_pair(per_pair_buffers) {}
  float* pair_buffer(int i) const { return base + 2 * i * pair_chunk * n; }
  float* chunk_buffer(int i) const { return base + 2 * (per_pair + i * chunk) * pair_chunk * n; }
};

// Pair chunks in turn; within each, the filter's spectrum, then batch chunks in turn.
template <class E>
void multipass_forward(const FftConvParams& prm, int64_t batch, void* workspace, void* stream) {
  FftPassParams q = pass_params(prm);
  const PassWorkspace w(prm, batch, workspace, 1);
  const int64_t pairs = w.pairs, pair_chunk = w.pair_chunk, chunk = w.chunk;
  float *spectrum_k = w.pair_buffer(0), *z = w.chunk_buffer(0), *t = w.chunk_buffer(1);
  for (int64_t q0 = 0; q0 < pairs; q0 += pair_chunk) {
    select_pairs(q, q0, pair_chunk);
    pass_filter_spectrum<E>(q, z, spectrum_k, stream);
    for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
      select_entries(q, b0, chunk, batch);
      pass_load<E>(q, 0, z, stream);
      pass_transform<E::kTensorCore, false>(q, z, t, stream);
      pass_product(q, kProductFilter, t, spectrum_k, z, false, stream);
      pass_transform<E::kTensorCore, true>(q, z, t, stream);
      q.src = t;
      launch_checked(fft_forward_epilogue_kernel<E>, "fft_forward_epilogue_kernel",
                     pointwise_grid(q.entries * prm.length * q.chunk_channels), 0, q, stream);
    }
  }
}

template <class E>
void multipass_backward(const FftConvParams& prm, int64_t batch, void* workspace, void* stream) {
  FftPassParams q = pass_params(prm);
  const PassWorkspace w(prm, batch, workspace, 2);
  const int64_t pairs = w.pairs, pair_chunk = w.pair_chunk, chunk = w.chunk;
  float *spectrum_k = w.pair_buffer(0), *spectrum_dk = w.pair_buffer(1);
  float *a = w.chunk_buffer(0), *g_hat = w.chunk_buffer(1), *v_hat = w.chunk_buffer(2);
  for (int64_t q0 = 0; q0 < pairs; q0 += pair_chunk) {
    select_pairs(q, q0, pair_chunk);
    pass_filter_spectrum<E>(q, a, spectrum_k, stream);
    for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
      select_entries(q, b0, chunk, batch);
      pass_load<E>(q, 0, a, stream);  // v = pre_gate * u
      pass_transform<E::kTensorCore, false>(q, a, v_hat, stream);
      pass_load<E>(q, 1, a, stream);  // g = post_gate * dy
      pass_transform<E::kTensorCore, false>(q, a, g_hat, stream);
      // dk's spectrum G conj V / n, summed over the batch in order (chunk after chunk).
      pass_product(q, kProductCross, g_hat, v_hat, spectrum_dk, b0 > 0, stream);
      if (prm.post) {  // v_hat becomes k (*) v, for d_post_gate
        pass_product(q, kProductFilter, v_hat, spectrum_k, a, false, stream);
        pass_transform<E::kTensorCore, true>(q, a, v_hat, stream);
      }
      // g_hat becomes dv, the inverse of G conj K / n.
      pass_product(q, kProductFilterConj, g_hat, spectrum_k, a, false, stream);
      pass_transform<E::kTensorCore, true>(q, a, g_hat, stream);
      q.src = g_hat;
      q.operand = v_hat;
      launch_checked(fft_backward_epilogue_kernel<E>, "fft_backward_epilogue_kernel",
                     pointwise_grid(q.entries * prm.length * q.chunk_channels), 0, q, stream);
    }
    // dk: the float32 inverse of its spectrum (spectrum_k is free by now), the first Lk taps.
    q.signals = q.pairs;
    pass_transform<false, true>(q, spectrum_dk, spectrum_k, stream);
    q.src = spectrum_k;
    launch_checked(fft_store_dk_kernel, "fft_store_dk_kernel",
                   pointwise_grid(q.chunk_channels * prm.taps), 0, q, stream);
  }
  if (prm.bias)
    launch_checked(fft_dbias_kernel<E>, "fft_dbias_kernel", dim3u(uint32_t(prm.channels), 1, 1),
                   kFftConvThreads * 4, q, stream);
}

template <class E>
void conv_forward(const FftConvProblem& p, void* stream) {
  FftConvParams prm = make_params(p);
  prm.out = p.out;
  Registrations r;
  register_buffers(r, p, false);
  r.commit();
  if (fft_conv_cuda_multipass(prm.n)) {
    if (!p.workspace)
      throw std::runtime_error("tokenmix: fft_conv's CUDA forward needs its workspace");
    return multipass_forward<E>(prm, p.batch, p.workspace, stream);
  }
  // Batch entries beyond the grid's height limit are looped over inside the blocks.
  const dim3u grid(uint32_t((p.channels + 1) / 2), uint32_t(p.batch < 65535 ? p.batch : 65535), 1);
  launch_checked(fft_conv_forward_kernel<E>, "fft_conv_forward_kernel", grid,
                 fft_conv_smem_bytes(prm.n, 3), prm, stream);
}

template <class E>
void conv_backward(const FftConvProblem& p, void* stream) {
  FftConvParams prm = make_params(p);
  prm.out = p.grad_u;
  Registrations r;
  register_buffers(r, p, true);
  r.commit();
  if (fft_conv_cuda_multipass(prm.n)) {
    if (!p.workspace)
      throw std::runtime_error("tokenmix: fft_conv's CUDA backward needs its workspace");
    return multipass_backward<E>(prm, p.batch, p.workspace, stream);
  }
  if (prm.chunks > 1 && !p.workspace)
    throw std::runtime_error("tokenmix: fft_conv's CUDA backward needs its workspace");
  const dim3u grid(uint32_t((p.channels + 1) / 2), uint32_t(prm.chunks), 1);
  launch_checked(fft_conv_backward_kernel<E>, "fft_conv_backward_kernel", grid,
                 fft_conv_smem_bytes(prm.n, 5), prm, stream);
  if (prm.chunks == 1) return;
  const int64_t elements = p.channels * (p.filter_length + 1);
  const dim3u reduce_grid(uint32_t((elements + kFftConvThreads - 1) / kFftConvThreads), 1, 1);
  launch_checked(fft_conv_reduce_kernel, "fft_conv_reduce_kernel", reduce_grid, 0, prm, stream);
}

}  // namespace tokenmix::cuda::fft_host
