// Host side of the CUDA fft_conv kernels (tokenmix/cuda/fft_conv.h): parameters, shared memory,
// the emulator's buffer registrations and the launches.
#pragma once

#include <stdexcept>
#include <string>

#include "tokenmix/cuda/fft_conv.h"
#include "tokenmix/cuda/fft_entry.h"
#include "tokenmix/cuda/launch_common.h"

namespace tokenmix::cuda::fft_host {

// Bytes from a strided tensor's first element to one past its last.
inline size_t extent_bytes(const FftTensor& t, const int64_t* shape, int dims) {
  if (!t.data) return 0;
  int64_t last = 0;
  for (int i = 0; i < dims; ++i) {
    if (shape[i] == 0) return 0;
    last += (shape[i] - 1) * t.stride[i];
  }
  return size_t(last + 1) * size_t(dtype_size(t.dtype));
}

inline void copy_strides(const FftTensor& t, int64_t* out, int dims) {
  for (int i = 0; i < dims; ++i) out[i] = t.stride[i];
}

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
  r.add(p.workspace,
        size_t(fft_conv_cuda_workspace_floats(p.batch, p.channels, p.filter_length)) * 4,
        "workspace");
}

// Launches kernel (after opting in to its shared memory) and reports a failed launch.
template <class K>
void launch_checked(K kernel, const char* name, dim3u grid, int64_t smem, const FftConvParams& prm,
                    void* stream) {
  if (smem > 0) prepare_shared(kernel, smem, checked_device(), name);
  launch_on(static_cast<stream_t>(stream), named(kernel, name), grid, dim3u(kFftConvThreads),
            size_t(smem), prm);
  check_launch(name);
}

template <class E>
void conv_forward(const FftConvProblem& p, void* stream) {
  FftConvParams prm = make_params(p);
  prm.out = p.out;
  Registrations r;
  register_buffers(r, p, false);
  r.commit();
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
