// CUDA implementation of torch.ops.tokenmix.fft_conv_forward / fft_conv_backward: the kernels of
// tokenmix/cuda/fft_conv.h built by nvcc (csrc/fft_mix/cuda/), launched on torch's current CUDA
// stream. Compiled into tokenmix/_C.so when CMake finds nvcc.
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

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CUDA, m) {
  m.impl("fft_conv_forward", TORCH_BOX(&fft_conv_forward_cuda));
  m.impl("fft_conv_backward", TORCH_BOX(&fft_conv_backward_cuda));
}
