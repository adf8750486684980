// The linear-scan ops' shared layer: argument checks, the problem descriptor and the outputs,
// for every backend (CPU kernels, CUDA kernels, and the CUDA kernels under the SIMT emulator).
// User-facing checks live in Python (tokenmix/linear_scan/args.py); these guard direct calls of
// the ops. Each backend supplies `run(problem, backward)`.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <optional>
#include <tuple>
#include <vector>

#include "scan_schemas.h"
#include "tokenmix/linear_scan_problem.h"
#include "tokenmix/stable_op_utils.h"

namespace tokenmix::scan_op {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline void set_strides(const Tensor& t, const char* name, int64_t* stride) {
  STD_TORCH_CHECK(t.dim() == 4, "tokenmix: ", name, " must be [B, T, H, D]");
  STD_TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "tokenmix: ", name,
                  " must have unit stride in its last dimension");
  stride[0] = t.stride(0);
  stride[1] = t.stride(1);
  stride[2] = t.stride(2);
}

// Checks an optional accumulation-type tensor on q's device and returns its data pointer.
inline const void* acc_tensor(const std::optional<Tensor>& t, const Tensor& q, ScalarType acc,
                              std::vector<int64_t> shape, const char* name) {
  if (!t.has_value()) return nullptr;
  STD_TORCH_CHECK(t->scalar_type() == acc && t->is_contiguous(), "tokenmix: ", name,
                  " must be a contiguous tensor in the accumulation dtype (float32; float64 for "
                  "float64 inputs)");
  STD_TORCH_CHECK(same_device(*t, q), "tokenmix: ", name, " must be on q's device");
  STD_TORCH_CHECK(t->dim() == int64_t(shape.size()), "tokenmix: ", name, " has the wrong shape");
  for (size_t i = 0; i < shape.size(); ++i)
    STD_TORCH_CHECK(t->size(int64_t(i)) == shape[i], "tokenmix: ", name, " has the wrong shape");
  return t->data_ptr();
}

// The problem of a scan. `on_cuda`: the tensors are CUDA tensors, whose cu_seqlens values are
// not read here (that would synchronize; the Python checks validate them).
inline LinearScanProblem make_problem(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const std::optional<Tensor>& g,
                                      const std::optional<Tensor>& gk,
                                      const std::optional<Tensor>& beta,
                                      const std::optional<Tensor>& initial_state,
                                      const std::optional<Tensor>& cu_seqlens, double scale,
                                      bool on_cuda) {
  LinearScanProblem p;
  STD_TORCH_CHECK(on_cuda ? q.is_cuda() : q.is_cpu(), "tokenmix: ", on_cuda ? "CUDA" : "CPU",
                  " kernel called with tensors on another device");
  STD_TORCH_CHECK(same_device(k, q) && same_device(v, q),
                  "tokenmix: q, k and v must be on one device");
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                  "tokenmix: q, k and v must have the same dtype");
  p.dtype = to_dtype(q.scalar_type());
  set_strides(q, "q", p.q_stride);
  set_strides(k, "k", p.k_stride);
  set_strides(v, "v", p.v_stride);
  p.batch = q.size(0);
  p.seq_len = q.size(1);
  p.heads = q.size(2);
  p.key_dim = q.size(3);
  p.value_dim = v.size(3);
  for (int i = 0; i < 3; ++i)
    STD_TORCH_CHECK(k.size(i) == q.size(i) && v.size(i) == q.size(i),
                    "tokenmix: q, k and v must agree in batch, time and heads");
  STD_TORCH_CHECK(k.size(3) == p.key_dim, "tokenmix: k must have q's head dim");
  const auto acc = accumulation_type(q.scalar_type());
  STD_TORCH_CHECK(!(g.has_value() && gk.has_value()), "tokenmix: give at most one of g and gk");
  p.g = acc_tensor(g, q, acc, {p.batch, p.seq_len, p.heads}, "g");
  p.gk = acc_tensor(gk, q, acc, {p.batch, p.seq_len, p.heads, p.key_dim}, "gk");
  p.beta = acc_tensor(beta, q, acc, {p.batch, p.seq_len, p.heads}, "beta");
  p.delta_rule = beta.has_value();
  p.decay = p.g ? DecayKind::kScalar : (p.gk ? DecayKind::kPerKey : DecayKind::kNone);
  p.num_seqs = p.batch;
  if (cu_seqlens.has_value()) {
    const Tensor& cu = *cu_seqlens;
    STD_TORCH_CHECK(cu.scalar_type() == ScalarType::Long && cu.dim() == 1 && cu.is_contiguous() &&
                        same_device(cu, q) && cu.size(0) >= 2,
                    "tokenmix: cu_seqlens must be a contiguous 1-D int64 tensor of N+1 offsets on "
                    "q's device");
    STD_TORCH_CHECK(p.batch == 1, "tokenmix: cu_seqlens requires batch size 1");
    const int64_t* off = static_cast<const int64_t*>(cu.data_ptr());
    const int64_t n = cu.size(0) - 1;
    if (!on_cuda) {
      STD_TORCH_CHECK(off[0] == 0 && off[n] == p.seq_len,
                      "tokenmix: cu_seqlens must start at 0 and end at T");
      for (int64_t i = 0; i < n; ++i)
        STD_TORCH_CHECK(off[i + 1] > off[i], "tokenmix: cu_seqlens must be strictly increasing");
    }
    p.cu_seqlens = off;
    p.num_seqs = n;
  }
  p.initial_state = acc_tensor(initial_state, q, acc, {p.num_seqs, p.heads, p.key_dim, p.value_dim},
                               "initial_state");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  check_scale(scale);
  p.scale = scale;
  return p;
}

// Checks and attaches the gradients flowing into the outputs of a scan.
inline void set_output_gradients(LinearScanProblem& p, const Tensor& q, const Tensor& grad_out,
                                 const std::optional<Tensor>& grad_final_state) {
  STD_TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.is_contiguous() &&
                      grad_out.dim() == 4 && grad_out.size(0) == p.batch &&
                      grad_out.size(1) == p.seq_len && grad_out.size(2) == p.heads &&
                      grad_out.size(3) == p.value_dim,
                  "tokenmix: grad_out must be a contiguous [B, T, H, V] tensor of q's dtype");
  STD_TORCH_CHECK(same_device(grad_out, q), "tokenmix: grad_out must be on q's device");
  p.grad_out = grad_out.data_ptr();
  p.grad_final_state =
      acc_tensor(grad_final_state, q, accumulation_type(q.scalar_type()),
                 {p.num_seqs, p.heads, p.key_dim, p.value_dim}, "grad_final_state");
}

inline Tensor empty_output(const Tensor& like, std::vector<int64_t> shape, ScalarType dtype,
                           const char* what) {
  return new_empty_checked(like, shape, dtype, what);
}

// Forward: (out, final_state); run(p, false) fills them.
template <class Run>
std::tuple<Tensor, Tensor> scan_forward(LinearScanProblem& p, const Tensor& q, const Run& run) {
  const auto acc = accumulation_type(q.scalar_type());
  Tensor out = empty_output(q, {p.batch, p.seq_len, p.heads, p.value_dim}, q.scalar_type(), "out");
  Tensor final_state =
      empty_output(q, {p.num_seqs, p.heads, p.key_dim, p.value_dim}, acc, "final_state");
  p.out = out.data_ptr();
  p.final_state = final_state.data_ptr();
  // V = 0: empty outputs, nothing to run (the CUDA grid would have no blocks).
  if (p.num_seqs * p.heads * p.value_dim > 0) run(p, false);
  return {out, final_state};
}

// Backward: (dq, dk, dv, d_beta or d_g, d_g or d_gk, d_initial_state), in the schemas' order;
// run(p, true) fills them. Absent decays get empty gradients.
template <class Run>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> scan_backward(
    LinearScanProblem& p, const Tensor& q, const Tensor& grad_out,
    const std::optional<Tensor>& grad_final_state, const Run& run) {
  const auto acc = accumulation_type(q.scalar_type());
  set_output_gradients(p, q, grad_out, grad_final_state);
  const int64_t B = p.batch, T = p.seq_len, H = p.heads, K = p.key_dim;
  Tensor dq = empty_output(q, {B, T, H, K}, q.scalar_type(), "dq");
  Tensor dk = empty_output(q, {B, T, H, K}, q.scalar_type(), "dk");
  Tensor dv = empty_output(q, {B, T, H, p.value_dim}, q.scalar_type(), "dv");
  Tensor dbeta =
      p.beta ? empty_output(q, {B, T, H}, acc, "dbeta") : empty_output(q, {0}, acc, "dbeta");
  Tensor dg = p.g ? empty_output(q, {B, T, H}, acc, "dg") : empty_output(q, {0}, acc, "dg");
  Tensor dgk = p.gk ? empty_output(q, {B, T, H, K}, acc, "dgk") : empty_output(q, {0}, acc, "dgk");
  Tensor dh0 = empty_output(q, {p.num_seqs, H, K, p.value_dim}, acc, "dh0");
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  p.grad_beta = p.beta ? dbeta.data_ptr() : nullptr;
  p.grad_g = p.g ? dg.data_ptr() : nullptr;
  p.grad_gk = p.gk ? dgk.data_ptr() : nullptr;
  p.grad_initial_state = dh0.data_ptr();
  if (p.value_dim == 0) {
    // No value column: o and the states are empty, so every gradient is zero.
    for (Tensor* t : {&dq, &dk, &dbeta, &dg, &dgk})
      if (t->numel() > 0) torch::stable::zero_(*t);
  } else if (p.num_seqs * H > 0) {
    run(p, true);
  }
  if (p.delta_rule) return {dq, dk, dv, dbeta, dg, dh0};
  return {dq, dk, dv, dg, dgk, dh0};
}

}  // namespace tokenmix::scan_op
