// CUDA implementations of torch.ops.tokenmix.na_forward / na_backward: the fused kernels of
// tokenmix/cuda/attention_engine.h, built by nvcc (csrc/neighborhood/cuda/) and launched on
// torch's current CUDA stream. Compiled into tokenmix/_C.so when CMake finds nvcc.
#include <torch/csrc/stable/accelerator.h>

#include "na_simt_op.h"
#include "tokenmix/current_stream.h"

namespace {

using namespace tokenmix::na_op;

struct GpuBackend {
  void* stream;
  bool poison = false;
  void forward(const tokenmix::NeighborhoodProblem& p) const {
    tokenmix::cuda::gpu::na_forward(p, stream);
  }
  void backward(const tokenmix::NeighborhoodProblem& p, bool deterministic,
                float* workspace) const {
    tokenmix::cuda::gpu::na_backward(p, deterministic, workspace, stream);
  }
};

GpuBackend backend_for(const Tensor& q) {
  STD_TORCH_CHECK(q.is_cuda(), "tokenmix: CUDA kernel called with non-CUDA tensors");
  return GpuBackend{tokenmix::current_cuda_stream(q.get_device())};
}

std::tuple<Tensor, Tensor> na_forward_cuda(Tensor q, Tensor k, Tensor v, std::optional<Tensor> rpb,
                                           std::optional<Tensor> extra_k,
                                           std::optional<Tensor> extra_v, IntList kernel,
                                           IntList stride, IntList dilation, IntList causal,
                                           double scale) {
  const torch::stable::accelerator::DeviceGuard guard(q.get_device());  // kernels launch there
  const GpuBackend backend = backend_for(q);
  return simt_forward(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation, causal, scale,
                      backend);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> na_backward_cuda(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
    std::optional<Tensor> rpb, std::optional<Tensor> extra_k, std::optional<Tensor> extra_v,
    IntList kernel, IntList stride, IntList dilation, IntList causal, double scale,
    std::optional<Tensor> grad_lse, bool deterministic) {
  const torch::stable::accelerator::DeviceGuard guard(q.get_device());
  const GpuBackend backend = backend_for(q);
  return simt_backward(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, kernel, stride, dilation,
                       causal, scale, grad_lse, deterministic, backend);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CUDA, m) {
  m.impl("na_forward", TORCH_BOX(&na_forward_cuda));
  m.impl("na_backward", TORCH_BOX(&na_backward_cuda));
}
