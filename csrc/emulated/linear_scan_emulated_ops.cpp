// torch.ops.tokenmix_emulated.linear_scan_* / delta_rule_*: the CUDA scan kernels
// run by the SIMT emulator on CPU tensors, through the same op layer as the CUDA ops (outputs,
// gradients and the workspace start as NaN). A test-only registration in tokenmix/_emulated.so.
#include <string>

#include "../linear_scan/scan_op_common.h"
#include "fill_nan.h"
#include "tokenmix/cuda/scan_entry.h"

namespace {

using namespace tokenmix::scan_op;
using tokenmix::DType;
using tokenmix::new_empty_checked;
using tokenmix::emulated_op::fill_nan;

auto emulated_run(const Tensor& q) {
  return [&q](tokenmix::LinearScanProblem& p, bool backward) {
    const std::string why = tokenmix::cuda::linear_scan_unsupported_reason(p);
    STD_TORCH_CHECK(why.empty(), why);
    const int64_t btH = p.batch * p.seq_len * p.heads;
    const int64_t state = p.num_seqs * p.heads * p.key_dim * p.value_dim;
    if (!backward) {
      fill_nan(p.out, p.dtype, btH * p.value_dim);
      fill_nan(p.final_state, DType::kFloat32, state);
      return tokenmix::cuda::emulated::linear_scan_forward(p, nullptr);
    }
    const Tensor workspace =
        new_empty_checked(q, {tokenmix::cuda::linear_scan_cuda_workspace_floats(p)},
                          ScalarType::Float, "the linear scan's CUDA workspace");
    p.workspace = static_cast<float*>(workspace.data_ptr());
    fill_nan(p.workspace, DType::kFloat32, workspace.numel());
    fill_nan(p.grad_q, p.dtype, btH * p.key_dim);
    fill_nan(p.grad_k, p.dtype, btH * p.key_dim);
    fill_nan(p.grad_v, p.dtype, btH * p.value_dim);
    fill_nan(p.grad_g, DType::kFloat32, btH);
    fill_nan(p.grad_gk, DType::kFloat32, btH * p.key_dim);
    fill_nan(p.grad_beta, DType::kFloat32, btH);
    fill_nan(p.grad_initial_state, DType::kFloat32, state);
    tokenmix::cuda::emulated::linear_scan_backward(p, nullptr);
  };
}

std::tuple<Tensor, Tensor> linear_scan_forward(Tensor q, Tensor k, Tensor v,
                                               std::optional<Tensor> g, std::optional<Tensor> gk,
                                               std::optional<Tensor> initial_state,
                                               std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_problem(q, k, v, g, gk, std::nullopt, initial_state, cu_seqlens, scale, false);
  return scan_forward(p, q, emulated_run(q));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_scan_backward(
    Tensor grad_out, std::optional<Tensor> grad_final_state, Tensor q, Tensor k, Tensor v,
    std::optional<Tensor> g, std::optional<Tensor> gk, std::optional<Tensor> initial_state,
    std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_problem(q, k, v, g, gk, std::nullopt, initial_state, cu_seqlens, scale, false);
  return scan_backward(p, q, grad_out, grad_final_state, emulated_run(q));
}

std::tuple<Tensor, Tensor> delta_rule_forward(Tensor q, Tensor k, Tensor v, Tensor beta,
                                              std::optional<Tensor> g,
                                              std::optional<Tensor> initial_state,
                                              std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_problem(q, k, v, g, std::nullopt, beta, initial_state, cu_seqlens, scale, false);
  return scan_forward(p, q, emulated_run(q));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> delta_rule_backward(
    Tensor grad_out, std::optional<Tensor> grad_final_state, Tensor q, Tensor k, Tensor v,
    Tensor beta, std::optional<Tensor> g, std::optional<Tensor> initial_state,
    std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_problem(q, k, v, g, std::nullopt, beta, initial_state, cu_seqlens, scale, false);
  return scan_backward(p, q, grad_out, grad_final_state, emulated_run(q));
}

// Shared memory per block of the CUDA scan kernels (the forward, or the backward's largest
// kernel), for the test of its Python mirror tokenmix.linear_scan.ops.cuda_smem_bytes.
int64_t linear_scan_cuda_smem_bytes(int64_t key_dim, bool delta, bool backward) {
  const int64_t key_pad = tokenmix::cuda::scan_key_pad(key_dim);
  const int64_t fwd = delta ? tokenmix::cuda::delta_smem_floats(key_pad, false)
                            : tokenmix::cuda::scan_smem_floats(key_pad, false);
  const int64_t bwd = delta ? tokenmix::cuda::delta_smem_floats(key_pad, true)
                            : tokenmix::cuda::scan_smem_floats(key_pad, true);
  return 4 * (backward && bwd > fwd ? bwd : fwd);
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix_emulated, m) {
  m.def(kLinearScanForwardSchema);
  m.def(kLinearScanBackwardSchema);
  m.def(kDeltaRuleForwardSchema);
  m.def(kDeltaRuleBackwardSchema);
  m.def("linear_scan_cuda_smem_bytes(int key_dim, bool delta, bool backward) -> int");
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix_emulated, CompositeExplicitAutograd, m) {
  m.impl("linear_scan_cuda_smem_bytes", TORCH_BOX(&linear_scan_cuda_smem_bytes));
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix_emulated, CPU, m) {
  m.impl("linear_scan_forward", TORCH_BOX(&linear_scan_forward));
  m.impl("linear_scan_backward", TORCH_BOX(&linear_scan_backward));
  m.impl("delta_rule_forward", TORCH_BOX(&delta_rule_forward));
  m.impl("delta_rule_backward", TORCH_BOX(&delta_rule_backward));
}
