// torch.ops.tokenmix.na_forward / na_backward: the op schemas and the CPU
// implementations, registered through PyTorch's stable C ABI (the CUDA ones are
// in na_cuda_ops.cpp). Argument checks are shared (na_op_common.h).
#include "na_op_common.h"
#include "na_schemas.h"
#include "tokenmix/cpu/isa_dispatch.h"

using namespace tokenmix::na_op;

namespace {

std::tuple<Tensor, Tensor> na_forward_cpu(Tensor q, Tensor k, Tensor v, std::optional<Tensor> rpb,
                                          std::optional<Tensor> extra_k,
                                          std::optional<Tensor> extra_v, IntList kernel,
                                          IntList stride, IntList dilation, IntList causal,
                                          double scale) {
  STD_TORCH_CHECK(q.is_cpu(), "tokenmix: CPU kernel called with non-CPU tensors");
  auto p = make_problem(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation, causal, scale);
  auto [out, lse] = forward_outputs(q, p);
  if (lse.numel() == 0) return {out, lse};  // nothing to compute (out is empty too)
  p.out = spatial_view(out, int(kernel.size()), "out");
  p.lse = lse.data_ptr();
  p.parallel_for = tokenmix::host_parallel_for;
  p.num_threads = int(torch::stable::get_num_threads());
  tokenmix::cpu::neighborhood_forward(p);
  return {out, lse};
}

// The CPU backward is always deterministic (per-task accumulators summed in order).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> na_backward_cpu(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
    std::optional<Tensor> rpb, std::optional<Tensor> extra_k, std::optional<Tensor> extra_v,
    IntList kernel, IntList stride, IntList dilation, IntList causal, double scale,
    std::optional<Tensor> grad_lse, bool deterministic) {
  STD_TORCH_CHECK(q.is_cpu(), "tokenmix: CPU kernel called with non-CPU tensors");
  auto p = make_problem(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation, causal, scale);
  BackwardOutputs g;
  if (prepare_backward(p, g, grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, grad_lse,
                       int(kernel.size()))) {
    p.parallel_for = tokenmix::host_parallel_for;
    p.num_threads = int(torch::stable::get_num_threads());
    tokenmix::cpu::neighborhood_backward(p);
  }
  return {g.dq, g.dk, g.dv, g.drpb, g.dek, g.dev};
}

}  // namespace

STABLE_TORCH_LIBRARY(tokenmix, m) {
  m.def(kForwardSchema);
  m.def(kBackwardSchema);
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("na_forward", TORCH_BOX(&na_forward_cpu));
  m.impl("na_backward", TORCH_BOX(&na_backward_cpu));
}
