// torch.ops.tokenmix.na_forward / na_backward: CPU implementations registered
// through PyTorch's stable C ABI. Argument checking that users hit happens in
// Python (tokenmix/neighborhood/args.py); the checks here guard direct calls
// of the ops, so a bad call raises instead of reading out of bounds.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <optional>
#include <tuple>

#include "tokenmix/attention_problem.h"
#include "tokenmix/cpu/isa_dispatch.h"
#include "tokenmix/stable_op_utils.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using IntList = torch::headeronly::HeaderOnlyArrayRef<int64_t>;

// [B, *spatial(rank), H, D] -> padded 6-D view.
tokenmix::StridedView spatial_view(const Tensor& t, int rank, const char* name) {
  STD_TORCH_CHECK(t.dim() == rank + 3, "tokenmix: ", name, " must have ", rank + 3, " dimensions");
  STD_TORCH_CHECK(t.stride(t.dim() - 1) == 1 || t.size(t.dim() - 1) <= 1, "tokenmix: ", name,
                  " must have unit stride in its last dimension");
  tokenmix::StridedView v;
  v.data = t.data_ptr();
  v.stride[0] = t.stride(0);
  for (int i = 0; i < 3; ++i) v.stride[1 + i] = 0;
  for (int i = 0; i < rank; ++i) v.stride[1 + 3 - rank + i] = t.stride(1 + i);
  v.stride[4] = t.stride(rank + 1);
  v.stride[5] = 1;
  return v;
}

// [B, N, H, D] -> view with the tokens on the last spatial axis.
tokenmix::StridedView extra_view(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.dim() == 4, "tokenmix: ", name, " must be [B, N, H, D]");
  STD_TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "tokenmix: ", name,
                  " must have unit stride in its last dimension");
  tokenmix::StridedView v;
  v.data = t.data_ptr();
  v.stride[0] = t.stride(0);
  v.stride[1] = v.stride[2] = 0;
  v.stride[3] = t.stride(1);
  v.stride[4] = t.stride(2);
  v.stride[5] = 1;
  return v;
}

tokenmix::NeighborhoodProblem make_problem(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const std::optional<Tensor>& rpb,
                                           const std::optional<Tensor>& extra_k,
                                           const std::optional<Tensor>& extra_v, IntList kernel,
                                           IntList stride, IntList dilation, IntList causal,
                                           double scale) {
  const int rank = int(kernel.size());
  STD_TORCH_CHECK(rank >= 1 && rank <= 3, "tokenmix: kernel_size must have 1 to 3 entries");
  STD_TORCH_CHECK(stride.size() == kernel.size() && dilation.size() == kernel.size() &&
                      causal.size() == kernel.size(),
                  "tokenmix: kernel_size, stride, dilation and is_causal must have equal lengths");
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(),
                  "tokenmix: CPU kernel called with non-CPU tensors");
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                  "tokenmix: q, k and v must have the same dtype");
  STD_TORCH_CHECK(
      q.dim() == rank + 3 && k.dim() == rank + 3 && v.dim() == rank + 3,
      "tokenmix: q, k and v must be [B, *spatial, H, D] with as many spatial dimensions "
      "as kernel_size has entries");
  tokenmix::NeighborhoodProblem p;
  p.dtype = tokenmix::to_dtype(q.scalar_type());
  p.batch = q.size(0);
  p.heads = q.size(rank + 1);
  p.head_dim = q.size(rank + 2);
  p.kv_heads = k.size(rank + 1);
  p.value_dim = v.size(rank + 2);
  STD_TORCH_CHECK(k.size(0) == p.batch && v.size(0) == p.batch,
                  "tokenmix: batch sizes of q, k, v differ");
  STD_TORCH_CHECK(k.size(rank + 2) == p.head_dim, "tokenmix: k head dim differs from q head dim");
  STD_TORCH_CHECK(v.size(rank + 1) == p.kv_heads, "tokenmix: k and v head counts differ");
  STD_TORCH_CHECK(p.kv_heads > 0 && p.heads % p.kv_heads == 0,
                  "tokenmix: q heads must be a multiple of k/v heads");
  for (int t = 0; t < 3; ++t) p.dims[t] = tokenmix::WindowDim{1, 1, 1, 1, false};
  for (int i = 0; i < rank; ++i) {
    const int64_t len = q.size(1 + i);
    STD_TORCH_CHECK(k.size(1 + i) == len && v.size(1 + i) == len,
                    "tokenmix: spatial shapes of q, k, v differ");
    STD_TORCH_CHECK(kernel[i] >= 1 && stride[i] >= 1 && stride[i] <= kernel[i] &&
                        dilation[i] >= 1 && kernel[i] * dilation[i] <= len,
                    "tokenmix: invalid window: need 1 <= stride <= kernel_size and kernel_size * "
                    "dilation <= input size");
    p.dims[3 - rank + i] = tokenmix::WindowDim{int(len), int(kernel[i]), int(stride[i]),
                                               int(dilation[i]), causal[i] != 0};
  }
  p.scale = scale;
  p.q = spatial_view(q, rank, "q");
  p.k = spatial_view(k, rank, "k");
  p.v = spatial_view(v, rank, "v");
  if (rpb.has_value()) {
    const Tensor& r = *rpb;
    STD_TORCH_CHECK(r.is_contiguous() && r.scalar_type() == q.scalar_type() &&
                        r.dim() == rank + 1 && r.size(0) == p.heads,
                    "tokenmix: rpb must be a contiguous [H, 2k-1, ...] tensor of q's dtype");
    for (int i = 0; i < rank; ++i)
      STD_TORCH_CHECK(r.size(1 + i) == 2 * kernel[i] - 1,
                      "tokenmix: rpb must have shape [H, 2k-1, ...]");
    p.rpb = r.data_ptr();
  }
  STD_TORCH_CHECK(extra_k.has_value() == extra_v.has_value(),
                  "tokenmix: additional_keys and additional_values must be given together");
  if (extra_k.has_value()) {
    const Tensor& ek = *extra_k;
    const Tensor& ev = *extra_v;
    STD_TORCH_CHECK(ek.scalar_type() == q.scalar_type() && ev.scalar_type() == q.scalar_type(),
                    "tokenmix: additional keys/values must have q's dtype");
    STD_TORCH_CHECK(
        ek.dim() == 4 && ev.dim() == 4 && ek.size(0) == p.batch && ev.size(0) == p.batch &&
            ek.size(1) == ev.size(1) && ek.size(2) == p.kv_heads && ev.size(2) == p.kv_heads &&
            ek.size(3) == p.head_dim && ev.size(3) == p.value_dim,
        "tokenmix: additional keys/values must be [B, N, H_kv, D] and [B, N, H_kv, Dv]");
    p.num_extra = ek.size(1);
    p.extra_k = extra_view(ek, "additional_keys");
    p.extra_v = extra_view(ev, "additional_values");
  }
  p.parallel_for = tokenmix::host_parallel_for;
  p.num_threads = int(torch::stable::get_num_threads());
  return p;
}

std::tuple<Tensor, Tensor> na_forward_cpu(Tensor q, Tensor k, Tensor v, std::optional<Tensor> rpb,
                                          std::optional<Tensor> extra_k,
                                          std::optional<Tensor> extra_v, IntList kernel,
                                          IntList stride, IntList dilation, IntList causal,
                                          double scale) {
  auto p = make_problem(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation, causal, scale);
  const int rank = int(kernel.size());
  std::vector<int64_t> out_size(q.sizes().begin(), q.sizes().end());
  out_size.back() = p.value_dim;
  std::vector<int64_t> lse_size(q.sizes().begin(), q.sizes().end() - 1);
  Tensor out = torch::stable::new_empty(q, out_size);
  const auto acc_type = tokenmix::accumulation_type(q.scalar_type());
  Tensor lse = torch::stable::new_empty(q, lse_size, acc_type);
  if (out.numel() == 0) return {out, lse};
  p.out = spatial_view(out, rank, "out");
  p.lse = lse.data_ptr();
  tokenmix::cpu::neighborhood_forward(p);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> na_backward_cpu(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
    std::optional<Tensor> rpb, std::optional<Tensor> extra_k, std::optional<Tensor> extra_v,
    IntList kernel, IntList stride, IntList dilation, IntList causal, double scale,
    std::optional<Tensor> grad_lse) {
  auto p = make_problem(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation, causal, scale);
  const int rank = int(kernel.size());
  STD_TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                  "tokenmix: grad_out and out must have q's dtype");
  const auto acc_type = tokenmix::accumulation_type(q.scalar_type());
  STD_TORCH_CHECK(lse.scalar_type() == acc_type && lse.is_contiguous() && lse.dim() == rank + 2,
                  "tokenmix: lse must be a contiguous [B, *spatial, H] tensor, float32 (float64 "
                  "for float64 inputs)");
  for (int i = 0; i < rank + 3; ++i) {
    const int64_t expect = i == rank + 2 ? p.value_dim : q.size(i);
    STD_TORCH_CHECK(grad_out.size(i) == expect && out.size(i) == expect,
                    "tokenmix: grad_out and out must have the output's shape");
    if (i < rank + 2)
      STD_TORCH_CHECK(lse.size(i) == q.size(i), "tokenmix: lse has the wrong shape");
  }
  Tensor dq = torch::stable::new_empty(q, std::vector<int64_t>(q.sizes().begin(), q.sizes().end()));
  Tensor dk = torch::stable::new_empty(k, std::vector<int64_t>(k.sizes().begin(), k.sizes().end()));
  Tensor dv = torch::stable::new_empty(v, std::vector<int64_t>(v.sizes().begin(), v.sizes().end()));
  Tensor drpb =
      rpb.has_value()
          ? torch::stable::new_empty(
                q, std::vector<int64_t>(rpb->sizes().begin(), rpb->sizes().end()), acc_type)
          : torch::stable::new_empty(q, std::vector<int64_t>{0}, acc_type);
  Tensor dek = extra_k.has_value()
                   ? torch::stable::new_empty(
                         q, std::vector<int64_t>(extra_k->sizes().begin(), extra_k->sizes().end()))
                   : torch::stable::new_empty(q, std::vector<int64_t>{0});
  Tensor dev = extra_v.has_value()
                   ? torch::stable::new_empty(
                         q, std::vector<int64_t>(extra_v->sizes().begin(), extra_v->sizes().end()))
                   : torch::stable::new_empty(q, std::vector<int64_t>{0});
  if (p.batch == 0 || p.heads == 0) {
    torch::stable::zero_(drpb);
    return {dq, dk, dv, drpb, dek, dev};
  }
  p.out = spatial_view(out, rank, "out");
  p.grad_out = spatial_view(grad_out, rank, "grad_out");
  p.lse = lse.data_ptr();
  if (grad_lse.has_value()) {
    STD_TORCH_CHECK(grad_lse->scalar_type() == lse.scalar_type() && grad_lse->is_contiguous() &&
                        grad_lse->numel() == lse.numel(),
                    "tokenmix: grad_lse must be a contiguous tensor like lse");
    p.grad_lse = grad_lse->data_ptr();
  }
  p.grad_q = spatial_view(dq, rank, "grad_q");
  p.grad_k.data = dk.data_ptr();
  p.grad_v.data = dv.data_ptr();
  p.grad_extra_k.data = dek.data_ptr();
  p.grad_extra_v.data = dev.data_ptr();
  p.grad_rpb = drpb.data_ptr();
  tokenmix::cpu::neighborhood_backward(p);
  return {dq, dk, dv, drpb, dek, dev};
}

}  // namespace

STABLE_TORCH_LIBRARY(tokenmix, m) {
  m.def(
      "na_forward(Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor? additional_keys, "
      "Tensor? additional_values, int[] kernel_size, int[] stride, int[] dilation, int[] "
      "is_causal, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "na_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? "
      "rpb, "
      "Tensor? additional_keys, Tensor? additional_values, int[] kernel_size, int[] stride, "
      "int[] dilation, int[] is_causal, float scale, Tensor? grad_lse=None) -> (Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("na_forward", TORCH_BOX(&na_forward_cpu));
  m.impl("na_backward", TORCH_BOX(&na_backward_cpu));
}
