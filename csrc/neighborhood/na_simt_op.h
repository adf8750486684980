// tokenmix::na_forward / na_backward on the CUDA engine (tokenmix/cuda/), shared by the CUDA
// implementation (na_cuda_ops.cpp: kernels built by nvcc, current CUDA stream) and the emulated
// one of the test library (csrc/emulated/: the same kernel source on the SIMT emulator, CPU
// tensors). The emulated one poisons every output with NaN first, so an element the kernels fail
// to write cannot pass a test.
#pragma once

#include <cmath>
#include <limits>
#include <string>

#include "na_op_common.h"
#include "tokenmix/cuda/na_entry.h"

namespace tokenmix::na_op {

// The checks of every implementation, then what only the CUDA engine requires (before any copy).
inline void check_supported(const Tensor& q, const Tensor& k, const Tensor& v,
                            const std::optional<Tensor>& rpb, const std::optional<Tensor>& extra_k,
                            const std::optional<Tensor>& extra_v, IntList kernel, IntList stride,
                            IntList dilation, IntList causal, double scale) {
  const auto p =
      make_problem(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation, causal, scale);
  const std::string reason = cuda::unsupported_reason(p);
  STD_TORCH_CHECK(reason.empty(), "tokenmix: ", reason);
}

// The kernels copy rows 16 bytes at a time: inputs whose rows are not aligned are copied.
inline void align_inputs(Tensor& q, Tensor& k, Tensor& v, std::optional<Tensor>& extra_k,
                         std::optional<Tensor>& extra_v) {
  q = aligned_rows(q);
  k = aligned_rows(k);
  v = aligned_rows(v);
  extra_k = aligned_rows(extra_k);
  extra_v = aligned_rows(extra_v);
}

// Backend: struct with forward(p), backward(p, deterministic, workspace) and a `poison` flag.
template <class Backend>
std::tuple<Tensor, Tensor> simt_forward(Tensor q, Tensor k, Tensor v, std::optional<Tensor> rpb,
                                        std::optional<Tensor> extra_k,
                                        std::optional<Tensor> extra_v, IntList kernel,
                                        IntList stride, IntList dilation, IntList causal,
                                        double scale, const Backend& backend) {
  check_supported(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation, causal, scale);
  align_inputs(q, k, v, extra_k, extra_v);
  auto p = make_problem(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation, causal, scale);
  auto [out, lse] = forward_outputs(q, p);
  if (lse.numel() == 0) return {out, lse};  // nothing to compute (out is empty too)
  if (backend.poison) {
    torch::stable::fill_(out, std::numeric_limits<double>::quiet_NaN());
    torch::stable::fill_(lse, std::numeric_limits<double>::quiet_NaN());
  }
  const int rank = int(kernel.size());
  p.out = spatial_view(out, rank, "out");
  p.lse = lse.data_ptr();
  backend.forward(p);
  return {out, lse};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> simt_backward(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
    std::optional<Tensor> rpb, std::optional<Tensor> extra_k, std::optional<Tensor> extra_v,
    IntList kernel, IntList stride, IntList dilation, IntList causal, double scale,
    std::optional<Tensor> grad_lse, bool deterministic, const Backend& backend) {
  check_supported(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation, causal, scale);
  align_inputs(q, k, v, extra_k, extra_v);
  grad_out = aligned_rows(grad_out);
  auto p = make_problem(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation, causal, scale);
  BackwardOutputs g;
  const int rank = int(kernel.size());
  if (!prepare_backward(p, g, grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, grad_lse, rank))
    return {g.dq, g.dk, g.dv, g.drpb, g.dek, g.dev};
  if (backend.poison) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (Tensor* t : {&g.dq, &g.dk, &g.dv, &g.dek, &g.dev})
      if (t->numel() > 0) torch::stable::fill_(*t, nan);
  }
  torch::stable::zero_(g.drpb);  // float atomics add into it
  const int64_t floats = cuda::backward_workspace_floats(p, deterministic);
  Tensor workspace = new_zeros_checked(q, std::vector<int64_t>{floats}, ScalarType::Float,
                                       "the backward workspace");
  backend.backward(p, deterministic, static_cast<float*>(workspace.data_ptr()));
  return {g.dq, g.dk, g.dv, g.drpb, g.dek, g.dev};
}

}  // namespace tokenmix::na_op
