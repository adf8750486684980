// torch.ops.tokenmix.linear_scan_forward / linear_scan_backward: CPU
// implementations registered through PyTorch's stable C ABI. User-facing
// argument checks live in Python (tokenmix/linear_scan/args.py); these guard
// direct calls of the ops.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <optional>
#include <tuple>
#include <vector>

#include "tokenmix/cpu/isa_dispatch.h"
#include "tokenmix/linear_scan_problem.h"
#include "tokenmix/stable_op_utils.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

void set_strides(const Tensor& t, const char* name, int64_t* stride) {
  STD_TORCH_CHECK(t.dim() == 4, "tokenmix: ", name, " must be [B, T, H, D]");
  STD_TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "tokenmix: ", name,
                  " must have unit stride in its last dimension");
  stride[0] = t.stride(0);
  stride[1] = t.stride(1);
  stride[2] = t.stride(2);
}

// Checks an optional accumulation-type tensor and returns its data pointer.
const void* acc_tensor(const std::optional<Tensor>& t, ScalarType acc, std::vector<int64_t> shape,
                       const char* name) {
  if (!t.has_value()) return nullptr;
  STD_TORCH_CHECK(t->scalar_type() == acc && t->is_contiguous() && t->is_cpu(), "tokenmix: ", name,
                  " must be a contiguous CPU tensor in the accumulation dtype (float32; float64 "
                  "for float64 inputs)");
  STD_TORCH_CHECK(t->dim() == int64_t(shape.size()), "tokenmix: ", name, " has the wrong shape");
  for (size_t i = 0; i < shape.size(); ++i)
    STD_TORCH_CHECK(t->size(int64_t(i)) == shape[i], "tokenmix: ", name, " has the wrong shape");
  return t->data_ptr();
}

tokenmix::LinearScanProblem make_scan_problem(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const std::optional<Tensor>& g,
                                              const std::optional<Tensor>& gk,
                                              const std::optional<Tensor>& beta,
                                              const std::optional<Tensor>& initial_state,
                                              const std::optional<Tensor>& cu_seqlens,
                                              double scale) {
  tokenmix::LinearScanProblem p;
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(),
                  "tokenmix: CPU kernel called with non-CPU tensors");
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                  "tokenmix: q, k and v must have the same dtype");
  p.dtype = tokenmix::to_dtype(q.scalar_type());
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
  const auto acc = tokenmix::accumulation_type(q.scalar_type());
  STD_TORCH_CHECK(!(g.has_value() && gk.has_value()), "tokenmix: give at most one of g and gk");
  p.g = acc_tensor(g, acc, {p.batch, p.seq_len, p.heads}, "g");
  p.gk = acc_tensor(gk, acc, {p.batch, p.seq_len, p.heads, p.key_dim}, "gk");
  p.beta = acc_tensor(beta, acc, {p.batch, p.seq_len, p.heads}, "beta");
  p.decay = p.g ? tokenmix::DecayKind::kScalar
                : (p.gk ? tokenmix::DecayKind::kPerKey : tokenmix::DecayKind::kNone);
  p.num_seqs = p.batch;
  if (cu_seqlens.has_value()) {
    const Tensor& cu = *cu_seqlens;
    STD_TORCH_CHECK(
        cu.scalar_type() == ScalarType::Long && cu.dim() == 1 && cu.is_contiguous() &&
            cu.is_cpu() && cu.size(0) >= 2,
        "tokenmix: cu_seqlens must be a contiguous 1-D int64 CPU tensor of N+1 offsets");
    STD_TORCH_CHECK(p.batch == 1, "tokenmix: cu_seqlens requires batch size 1");
    const int64_t* off = static_cast<const int64_t*>(cu.data_ptr());
    const int64_t n = cu.size(0) - 1;
    STD_TORCH_CHECK(off[0] == 0 && off[n] == p.seq_len,
                    "tokenmix: cu_seqlens must start at 0 and end at T");
    for (int64_t i = 0; i < n; ++i)
      STD_TORCH_CHECK(off[i + 1] > off[i], "tokenmix: cu_seqlens must be strictly increasing");
    p.cu_seqlens = off;
    p.num_seqs = n;
  }
  p.initial_state = acc_tensor(initial_state, acc, {p.num_seqs, p.heads, p.key_dim, p.value_dim},
                               "initial_state");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  tokenmix::check_scale(scale);
  p.scale = scale;
  p.parallel_for = tokenmix::host_parallel_for;
  p.num_threads = int(torch::stable::get_num_threads());
  return p;
}

// Checks and attaches the gradients flowing into the outputs of a scan.
void set_output_gradients(tokenmix::LinearScanProblem& p, const Tensor& q, const Tensor& grad_out,
                          const std::optional<Tensor>& grad_final_state) {
  STD_TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.is_contiguous() &&
                      grad_out.dim() == 4 && grad_out.size(0) == p.batch &&
                      grad_out.size(1) == p.seq_len && grad_out.size(2) == p.heads &&
                      grad_out.size(3) == p.value_dim,
                  "tokenmix: grad_out must be a contiguous [B, T, H, V] tensor of q's dtype");
  p.grad_out = grad_out.data_ptr();
  p.grad_final_state =
      acc_tensor(grad_final_state, tokenmix::accumulation_type(q.scalar_type()),
                 {p.num_seqs, p.heads, p.key_dim, p.value_dim}, "grad_final_state");
}

// An output on like's device; out of memory is reported with the tensor's name and size.
Tensor empty_like_shape(const Tensor& like, std::vector<int64_t> shape, ScalarType dtype,
                        const char* what) {
  return tokenmix::new_empty_checked(like, shape, dtype, what);
}

std::tuple<Tensor, Tensor> linear_scan_forward_cpu(Tensor q, Tensor k, Tensor v,
                                                   std::optional<Tensor> g,
                                                   std::optional<Tensor> gk,
                                                   std::optional<Tensor> initial_state,
                                                   std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_scan_problem(q, k, v, g, gk, std::nullopt, initial_state, cu_seqlens, scale);
  const auto acc = tokenmix::accumulation_type(q.scalar_type());
  Tensor out =
      empty_like_shape(q, {p.batch, p.seq_len, p.heads, p.value_dim}, q.scalar_type(), "out");
  Tensor final_state =
      empty_like_shape(q, {p.num_seqs, p.heads, p.key_dim, p.value_dim}, acc, "final_state");
  p.out = out.data_ptr();
  p.final_state = final_state.data_ptr();
  if (p.num_seqs * p.heads > 0) tokenmix::cpu::linear_scan(p, false);
  return {out, final_state};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_scan_backward_cpu(
    Tensor grad_out, std::optional<Tensor> grad_final_state, Tensor q, Tensor k, Tensor v,
    std::optional<Tensor> g, std::optional<Tensor> gk, std::optional<Tensor> initial_state,
    std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_scan_problem(q, k, v, g, gk, std::nullopt, initial_state, cu_seqlens, scale);
  const auto acc = tokenmix::accumulation_type(q.scalar_type());
  set_output_gradients(p, q, grad_out, grad_final_state);
  Tensor dq = empty_like_shape(q, {p.batch, p.seq_len, p.heads, p.key_dim}, q.scalar_type(), "dq");
  Tensor dk = empty_like_shape(q, {p.batch, p.seq_len, p.heads, p.key_dim}, q.scalar_type(), "dk");
  Tensor dv =
      empty_like_shape(q, {p.batch, p.seq_len, p.heads, p.value_dim}, q.scalar_type(), "dv");
  Tensor dg = g.has_value() ? empty_like_shape(q, {p.batch, p.seq_len, p.heads}, acc, "dg")
                            : empty_like_shape(q, {0}, acc, "dg");
  Tensor dgk = gk.has_value()
                   ? empty_like_shape(q, {p.batch, p.seq_len, p.heads, p.key_dim}, acc, "dgk")
                   : empty_like_shape(q, {0}, acc, "dgk");
  Tensor dh0 = empty_like_shape(q, {p.num_seqs, p.heads, p.key_dim, p.value_dim}, acc, "dh0");
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  p.grad_g = g.has_value() ? dg.data_ptr() : nullptr;
  p.grad_gk = gk.has_value() ? dgk.data_ptr() : nullptr;
  p.grad_initial_state = dh0.data_ptr();
  if (p.num_seqs * p.heads > 0) tokenmix::cpu::linear_scan(p, true);
  return {dq, dk, dv, dg, dgk, dh0};
}

std::tuple<Tensor, Tensor> delta_rule_forward_cpu(Tensor q, Tensor k, Tensor v, Tensor beta,
                                                  std::optional<Tensor> g,
                                                  std::optional<Tensor> initial_state,
                                                  std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_scan_problem(q, k, v, g, std::nullopt, beta, initial_state, cu_seqlens, scale);
  const auto acc = tokenmix::accumulation_type(q.scalar_type());
  Tensor out =
      empty_like_shape(q, {p.batch, p.seq_len, p.heads, p.value_dim}, q.scalar_type(), "out");
  Tensor final_state =
      empty_like_shape(q, {p.num_seqs, p.heads, p.key_dim, p.value_dim}, acc, "final_state");
  p.out = out.data_ptr();
  p.final_state = final_state.data_ptr();
  if (p.num_seqs * p.heads > 0) tokenmix::cpu::delta_rule(p, false);
  return {out, final_state};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> delta_rule_backward_cpu(
    Tensor grad_out, std::optional<Tensor> grad_final_state, Tensor q, Tensor k, Tensor v,
    Tensor beta, std::optional<Tensor> g, std::optional<Tensor> initial_state,
    std::optional<Tensor> cu_seqlens, double scale) {
  auto p = make_scan_problem(q, k, v, g, std::nullopt, beta, initial_state, cu_seqlens, scale);
  const auto acc = tokenmix::accumulation_type(q.scalar_type());
  set_output_gradients(p, q, grad_out, grad_final_state);
  Tensor dq = empty_like_shape(q, {p.batch, p.seq_len, p.heads, p.key_dim}, q.scalar_type(), "dq");
  Tensor dk = empty_like_shape(q, {p.batch, p.seq_len, p.heads, p.key_dim}, q.scalar_type(), "dk");
  Tensor dv =
      empty_like_shape(q, {p.batch, p.seq_len, p.heads, p.value_dim}, q.scalar_type(), "dv");
  Tensor dbeta = empty_like_shape(q, {p.batch, p.seq_len, p.heads}, acc, "dbeta");
  Tensor dg = g.has_value() ? empty_like_shape(q, {p.batch, p.seq_len, p.heads}, acc, "dg")
                            : empty_like_shape(q, {0}, acc, "dg");
  Tensor dh0 = empty_like_shape(q, {p.num_seqs, p.heads, p.key_dim, p.value_dim}, acc, "dh0");
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  p.grad_beta = dbeta.data_ptr();
  p.grad_g = g.has_value() ? dg.data_ptr() : nullptr;
  p.grad_initial_state = dh0.data_ptr();
  if (p.num_seqs * p.heads > 0) tokenmix::cpu::delta_rule(p, true);
  return {dq, dk, dv, dbeta, dg, dh0};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  m.def(
      "linear_scan_forward(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? gk, "
      "Tensor? initial_state, Tensor? cu_seqlens, float scale) -> (Tensor, Tensor)");
  m.def(
      "linear_scan_backward(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, "
      "Tensor v, Tensor? g, Tensor? gk, Tensor? initial_state, Tensor? cu_seqlens, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "delta_rule_forward(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, "
      "Tensor? initial_state, Tensor? cu_seqlens, float scale) -> (Tensor, Tensor)");
  m.def(
      "delta_rule_backward(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, "
      "Tensor v, Tensor beta, Tensor? g, Tensor? initial_state, Tensor? cu_seqlens, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("linear_scan_forward", TORCH_BOX(&linear_scan_forward_cpu));
  m.impl("linear_scan_backward", TORCH_BOX(&linear_scan_backward_cpu));
  m.impl("delta_rule_forward", TORCH_BOX(&delta_rule_forward_cpu));
  m.impl("delta_rule_backward", TORCH_BOX(&delta_rule_backward_cpu));
}
