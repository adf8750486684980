// CUDA implementations of the FFT-mixing ops (fft_conv_*, fourier_mix, global_filter_*,
// spectral_gate_*): the kernels of tokenmix/cuda/fft_conv.h and fft_mix_kernels.h built by nvcc
// (csrc/fft_mix/cuda/), launched on torch's current CUDA stream. Compiled into tokenmix/_C.so
// when CMake finds nvcc.
#include <torch/csrc/stable/accelerator.h>

#include "fft_op_common.h"
#include "tokenmix/cuda/fft_entry.h"
#include "tokenmix/current_stream.h"

namespace {

using namespace tokenmix::fft_op;

// Runs the kernels on u's device and its current stream; the workspace is freed after the
// launches, which the caching allocator orders after them on the stream.
struct GpuConv {
  const Tensor* u;
  void* stream;
  void operator()(tokenmix::FftConvProblem& p, bool backward) const {
    const std::string why = tokenmix::cuda::fft_conv_unsupported_reason(p);
    STD_TORCH_CHECK(why.empty(), why);
    const Tensor workspace = conv_workspace(*u, p, backward);
    if (backward)
      tokenmix::cuda::gpu::fft_conv_backward(p, stream);
    else
      tokenmix::cuda::gpu::fft_conv_forward(p, stream);
  }
};

GpuConv conv_on(const Tensor& u) {
  STD_TORCH_CHECK(u.is_cuda(), "tokenmix: CUDA kernel called with non-CUDA tensors");
  return GpuConv{&u, tokenmix::current_cuda_stream(u.get_device())};
}

Tensor fft_conv_forward_cuda(Tensor u, Tensor k, std::optional<Tensor> bias,
                             std::optional<Tensor> pre_gate, std::optional<Tensor> post_gate,
                             bool causal) {
  const torch::stable::accelerator::DeviceGuard guard(u.get_device());
  return conv_forward(u, k, bias, pre_gate, post_gate, causal, conv_on(u));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fft_conv_backward_cuda(
    Tensor grad_out, Tensor u, Tensor k, std::optional<Tensor> bias, std::optional<Tensor> pre_gate,
    std::optional<Tensor> post_gate, bool causal) {
  const torch::stable::accelerator::DeviceGuard guard(u.get_device());
  return conv_backward(grad_out, u, k, bias, pre_gate, post_gate, causal, conv_on(u));
}

// ---- fourier_mix, global_filter, spectral_gate: workspaces allocated per call, freed after
// the launches like fft_conv's.

void* stream_of(const Tensor& x) {
  STD_TORCH_CHECK(x.is_cuda(), "tokenmix: CUDA kernel called with non-CUDA tensors");
  return tokenmix::current_cuda_stream(x.get_device());
}

Tensor fourier_mix_cuda(Tensor x) {
  const torch::stable::accelerator::DeviceGuard guard(x.get_device());
  return mix_forward(x, [&](tokenmix::FourierMixProblem& p) {
    require_supported(
        tokenmix::cuda::fft_mix_unsupported_reason(p.dtype, {p.length, p.channels}, "fourier_mix"));
    const Tensor workspace = mix_workspace(x, p);
    tokenmix::cuda::gpu::fourier_mix(p, stream_of(x));
  });
}

auto filter_on(const Tensor& x) {
  return [&x](tokenmix::GlobalFilterProblem& p, bool backward) {
    require_supported(
        tokenmix::cuda::fft_mix_unsupported_reason(p.dtype, {p.height, p.width}, "global_filter"));
    const Tensor workspace = filter_workspace(x, p, backward);
    tokenmix::cuda::gpu::global_filter(p, backward, stream_of(x));
  };
}

Tensor global_filter_forward_cuda(Tensor x, Tensor weight) {
  const torch::stable::accelerator::DeviceGuard guard(x.get_device());
  return filter_forward(x, weight, filter_on(x));
}

std::tuple<Tensor, Tensor> global_filter_backward_cuda(Tensor grad_out, Tensor x, Tensor weight) {
  const torch::stable::accelerator::DeviceGuard guard(x.get_device());
  return filter_backward(grad_out, x, weight, filter_on(x));
}

auto gate_on(const Tensor& x) {
  return [&x](tokenmix::SpectralGateProblem& p, bool backward) {
    require_supported(
        tokenmix::cuda::fft_mix_unsupported_reason(p.dtype, {p.length}, "spectral_gate"));
    const Tensor workspace = gate_workspace(x, p, backward);
    tokenmix::cuda::gpu::spectral_gate(p, backward, stream_of(x));
  };
}

Tensor spectral_gate_forward_cuda(Tensor x, Tensor gate, std::optional<Tensor> bias, int64_t heads,
                                  bool modrelu) {
  const torch::stable::accelerator::DeviceGuard guard(x.get_device());
  return gate_forward(x, gate, bias, heads, modrelu, gate_on(x));
}

std::tuple<Tensor, Tensor, Tensor> spectral_gate_backward_cuda(Tensor grad_out, Tensor x,
                                                               Tensor gate,
                                                               std::optional<Tensor> bias,
                                                               int64_t heads, bool modrelu) {
  const torch::stable::accelerator::DeviceGuard guard(x.get_device());
  return gate_backward(grad_out, x, gate, bias, heads, modrelu, gate_on(x));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CUDA, m) {
  m.impl("fft_conv_forward", TORCH_BOX(&fft_conv_forward_cuda));
  m.impl("fft_conv_backward", TORCH_BOX(&fft_conv_backward_cuda));
  m.impl("fourier_mix", TORCH_BOX(&fourier_mix_cuda));
  m.impl("global_filter_forward", TORCH_BOX(&global_filter_forward_cuda));
  m.impl("global_filter_backward", TORCH_BOX(&global_filter_backward_cuda));
  m.impl("spectral_gate_forward", TORCH_BOX(&spectral_gate_forward_cuda));
  m.impl("spectral_gate_backward", TORCH_BOX(&spectral_gate_backward_cuda));
}
