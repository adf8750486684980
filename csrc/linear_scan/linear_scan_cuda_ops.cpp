// CUDA implementations of linear_scan_forward / linear_scan_backward and delta_rule_forward /
// delta_rule_backward: the kernels of tokenmix/cuda/linear_scan_kernels.h and delta_rule_kernels.h
// built by nvcc (csrc/linear_scan/cuda/), launched on torch's current CUDA stream. Compiled into
// tokenmix/_C.so when CMake finds nvcc.
#include <torch/csrc/stable/accelerator.h>

#include <string>

#include "scan_op_common.h"
#include "tokenmix/cuda/scan_entry.h"
#include "tokenmix/current_stream.h"

namespace {

using namespace tokenmix::scan_op;
using tokenmix::new_empty_checked;

// Runs the kernels on q's device and its current stream; the backward's workspace is freed
// after the launches, which the caching allocator orders after them on the stream.
auto gpu_run(const Tensor& q) {
  return [&q](tokenmix::LinearScanProblem& p, bool backward) {
    const std::string why = tokenmix::cuda::linear_scan_unsupported_reason(p);
    STD_TORCH_CHECK(why.empty(), why);
    void* stream = tokenmix::current_cuda_stream(q.get_device());
    if (!backward) return tokenmix::cuda::gpu::linear_scan_forward(p, stream);
    const Tensor workspace =
        new_empty_checked(q, {tokenmix::cuda::linear_scan_cuda_workspace_floats(p)},
                          ScalarType::Float, "the linear scan's CUDA workspace");
    p.workspace = static_cast<float*>(workspace.data_ptr());
    tokenmix::cuda::gpu::linear_scan_backward(p, stream);
  };
}

std::tuple<Tensor, Tensor> linear_scan_forward_cuda(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> g, std::optional<Tensor> gk,
    std::optional<Tensor> initial_state, std::optional<Tensor> cu_seqlens, double scale) {
  const torch::stable::accelerator::DeviceGuard guard(q.get_device());
  auto p = make_problem(q, k, v, g, gk, std::nullopt, initial_state, cu_seqlens, scale, true);
  return scan_forward(p, q, gpu_run(q));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_scan_backward_cuda(
    Tensor grad_out, std::optional<Tensor> grad_final_state, Tensor q, Tensor k, Tensor v,
    std::optional<Tensor> g, std::optional<Tensor> gk, std::optional<Tensor> initial_state,
    std::optional<Tensor> cu_seqlens, double scale) {
  const torch::stable::accelerator::DeviceGuard guard(q.get_device());
  auto p = make_problem(q, k, v, g, gk, std::nullopt, initial_state, cu_seqlens, scale, true);
  return scan_backward(p, q, grad_out, grad_final_state, gpu_run(q));
}

std::tuple<Tensor, Tensor> delta_rule_forward_cuda(Tensor q, Tensor k, Tensor v, Tensor beta,
                                                   std::optional<Tensor> g,
                                                   std::optional<Tensor> initial_state,
                                                   std::optional<Tensor> cu_seqlens, double scale) {
  const torch::stable::accelerator::DeviceGuard guard(q.get_device());
  auto p = make_problem(q, k, v, g, std::nullopt, beta, initial_state, cu_seqlens, scale, true);
  return scan_forward(p, q, gpu_run(q));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> delta_rule_backward_cuda(
    Tensor grad_out, std::optional<Tensor> grad_final_state, Tensor q, Tensor k, Tensor v,
    Tensor beta, std::optional<Tensor> g, std::optional<Tensor> initial_state,
    std::optional<Tensor> cu_seqlens, double scale) {
  const torch::stable::accelerator::DeviceGuard guard(q.get_device());
  auto p = make_problem(q, k, v, g, std::nullopt, beta, initial_state, cu_seqlens, scale, true);
  return scan_backward(p, q, grad_out, grad_final_state, gpu_run(q));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CUDA, m) {
  m.impl("linear_scan_forward", TORCH_BOX(&linear_scan_forward_cuda));
  m.impl("linear_scan_backward", TORCH_BOX(&linear_scan_backward_cuda));
  m.impl("delta_rule_forward", TORCH_BOX(&delta_rule_forward_cuda));
  m.impl("delta_rule_backward", TORCH_BOX(&delta_rule_backward_cuda));
}
