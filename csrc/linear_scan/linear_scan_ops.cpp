// torch.ops.tokenmix.linear_scan_forward / linear_scan_backward / delta_rule_forward /
// delta_rule_backward: the schemas, and the CPU implementations registered through PyTorch's
// stable C ABI (the shared checks are in scan_op_common.h).
#include "scan_op_common.h"
#include "tokenmix/cpu/isa_dispatch.h"

namespace {

using namespace tokenmix::scan_op;

// Runs the CPU kernels on torch's intra-op thread pool.
auto cpu_run(bool delta_rule) {
  return [delta_rule](tokenmix::LinearScanProblem& p, bool backward) {
    p.parallel_for = tokenmix::host_parallel_for;
    p.num_threads = int(torch::stable::get_num_threads());
    if (delta_rule)
      tokenmix::cpu::delta_rule(p, backward);
    else
      tokenmix::cpu::linear_scan(p, backward);
  };
}

std::tuple<Tensor, Tensor> linear_scan_forward_cpu(Tensor q, Tensor k, Tensor v,
                                                   std::optional<Tensor> g,
                                                   std::optional<Tensor> gk,
                                                   std::optional<Tensor> initial_state,
                                                   std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_problem(q, k, v, g, gk, std::nullopt, initial_state, cu_seqlens, scale, false);
  return scan_forward(p, q, cpu_run(false));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_scan_backward_cpu(
    Tensor grad_out, std::optional<Tensor> grad_final_state, Tensor q, Tensor k, Tensor v,
    std::optional<Tensor> g, std::optional<Tensor> gk, std::optional<Tensor> initial_state,
    std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_problem(q, k, v, g, gk, std::nullopt, initial_state, cu_seqlens, scale, false);
  return scan_backward(p, q, grad_out, grad_final_state, cpu_run(false));
}

std::tuple<Tensor, Tensor> delta_rule_forward_cpu(Tensor q, Tensor k, Tensor v, Tensor beta,
                                                  std::optional<Tensor> g,
                                                  std::optional<Tensor> initial_state,
                                                  std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_problem(q, k, v, g, std::nullopt, beta, initial_state, cu_seqlens, scale, false);
  return scan_forward(p, q, cpu_run(true));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> delta_rule_backward_cpu(
    Tensor grad_out, std::optional<Tensor> grad_final_state, Tensor q, Tensor k, Tensor v,
    Tensor beta, std::optional<Tensor> g, std::optional<Tensor> initial_state,
    std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_problem(q, k, v, g, std::nullopt, beta, initial_state, cu_seqlens, scale, false);
  return scan_backward(p, q, grad_out, grad_final_state, cpu_run(true));
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  m.def(kLinearScanForwardSchema);
  m.def(kLinearScanBackwardSchema);
  m.def(kDeltaRuleForwardSchema);
  m.def(kDeltaRuleBackwardSchema);
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("linear_scan_forward", TORCH_BOX(&linear_scan_forward_cpu));
  m.impl("linear_scan_backward", TORCH_BOX(&linear_scan_backward_cpu));
  m.impl("delta_rule_forward", TORCH_BOX(&delta_rule_forward_cpu));
  m.impl("delta_rule_backward", TORCH_BOX(&delta_rule_backward_cpu));
}
