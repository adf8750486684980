// Argument checking, output allocation and problem building shared by every implementation of
// tokenmix::na_forward / na_backward (CPU, CUDA, and the emulated CUDA kernels of the test
// library). Torch stable ABI only. Checks that users hit first happen in Python
// (tokenmix/neighborhood/args.py); these guard direct calls of the ops, so a bad call raises
// instead of reading out of bounds.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "na_window_args.h"
#include "tokenmix/attention_problem.h"
#include "tokenmix/stable_op_utils.h"

namespace tokenmix::na_op {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using IntList = torch::headeronly::HeaderOnlyArrayRef<int64_t>;

// [B, *spatial(rank), H, D] -> padded 6-D view.
inline StridedView spatial_view(const Tensor& t, int rank, const char* name) {
  STD_TORCH_CHECK(t.dim() == rank + 3, "tokenmix: ", name, " must have ", rank + 3, " dimensions");
  STD_TORCH_CHECK(t.stride(t.dim() - 1) == 1 || t.size(t.dim() - 1) <= 1, "tokenmix: ", name,
                  " must have unit stride in its last dimension");
  StridedView v;
  v.data = t.data_ptr();
  v.stride[0] = t.stride(0);
  for (int i = 0; i < 3; ++i) v.stride[1 + i] = 0;
  for (int i = 0; i < rank; ++i) v.stride[1 + 3 - rank + i] = t.stride(1 + i);
  v.stride[4] = t.stride(rank + 1);
  v.stride[5] = 1;
  return v;
}

// [B, N, H, D] -> view with the tokens on the last spatial axis.
inline StridedView extra_view(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.dim() == 4, "tokenmix: ", name, " must be [B, N, H, D]");
  STD_TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "tokenmix: ", name,
                  " must have unit stride in its last dimension");
  StridedView v;
  v.data = t.data_ptr();
  v.stride[0] = t.stride(0);
  v.stride[1] = v.stride[2] = 0;
  v.stride[3] = t.stride(1);
  v.stride[4] = t.stride(2);
  v.stride[5] = 1;
  return v;
}

inline NeighborhoodProblem make_problem(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const std::optional<Tensor>& rpb,
                                        const std::optional<Tensor>& extra_k,
                                        const std::optional<Tensor>& extra_v, IntList kernel,
                                        IntList stride, IntList dilation, IntList causal,
                                        double scale) {
  STD_TORCH_CHECK(kernel.size() >= 1 && kernel.size() <= 3,
                  "tokenmix: kernel_size must have 1 to 3 entries (one per spatial dimension), "
                  "got ",
                  kernel.size());
  const int rank = int(kernel.size());
  STD_TORCH_CHECK(same_device(q, k) && same_device(q, v),
                  "tokenmix: q, k and v must be on the same device");
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                  "tokenmix: q, k and v must have the same dtype");
  STD_TORCH_CHECK(
      q.dim() == rank + 3 && k.dim() == rank + 3 && v.dim() == rank + 3,
      "tokenmix: q, k and v must be [B, *spatial, H, D] with as many spatial dimensions "
      "as kernel_size has entries");
  check_scale(scale);
  NeighborhoodProblem p;
  p.dtype = to_dtype(q.scalar_type());
  p.batch = q.size(0);
  p.heads = q.size(rank + 1);
  p.head_dim = q.size(rank + 2);
  p.kv_heads = k.size(rank + 1);
  p.value_dim = v.size(rank + 2);
  STD_TORCH_CHECK(k.size(0) == p.batch && v.size(0) == p.batch,
                  "tokenmix: batch sizes of q, k, v differ");
  STD_TORCH_CHECK(k.size(rank + 2) == p.head_dim, "tokenmix: k head dim differs from q head dim");
  // D = 0 (every logit 0) is not computed: the kernels need at least one feature. Dv = 0 is
  // (the output is empty, the LSE and the gradients through it are not).
  STD_TORCH_CHECK(p.head_dim >= 1, "tokenmix: the head dim of q and k (D) must be >= 1, got ",
                  p.head_dim);
  STD_TORCH_CHECK(v.size(rank + 1) == p.kv_heads, "tokenmix: k and v head counts differ");
  STD_TORCH_CHECK(p.kv_heads > 0 && p.heads % p.kv_heads == 0,
                  "tokenmix: q heads must be a multiple of k/v heads");
  int64_t lengths[3] = {0, 0, 0};
  for (int i = 0; i < rank; ++i) {
    lengths[i] = q.size(1 + i);
    STD_TORCH_CHECK(k.size(1 + i) == lengths[i] && v.size(1 + i) == lengths[i],
                    "tokenmix: spatial shapes of q, k, v differ");
  }
  check_window_args(lengths, rank, kernel, stride, dilation, causal, "q spatial size", p.dims);
  // Sizes of the outputs and the kernels' flat indices (batch, token, head, feature) must fit
  // int64 even where a zero size elsewhere keeps numel() at 0 (expanded or empty inputs).
  const int64_t feature = std::max<int64_t>({int64_t(1), p.head_dim, p.value_dim});
  int64_t rows = p.batch;
  for (int i = 0; i < rank; ++i) rows = checked_mul(rows, lengths[i], "B * tokens");
  rows = checked_mul(rows, std::max(p.heads, p.kv_heads), "B * tokens * heads");
  checked_mul(rows, feature, "B * tokens * heads * head dim");
  p.scale = scale;
  p.q = spatial_view(q, rank, "q");
  p.k = spatial_view(k, rank, "k");
  p.v = spatial_view(v, rank, "v");
  if (rpb.has_value()) {
    const Tensor& r = *rpb;
    STD_TORCH_CHECK(r.is_contiguous() && r.scalar_type() == q.scalar_type() &&
                        r.dim() == rank + 1 && r.size(0) == p.heads && same_device(r, q),
                    "tokenmix: rpb must be a contiguous [H, 2k-1, ...] tensor of q's dtype and "
                    "device");
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
    STD_TORCH_CHECK(ek.scalar_type() == q.scalar_type() && ev.scalar_type() == q.scalar_type() &&
                        same_device(ek, q) && same_device(ev, q),
                    "tokenmix: additional keys/values must have q's dtype and device");
    STD_TORCH_CHECK(
        ek.dim() == 4 && ev.dim() == 4 && ek.size(0) == p.batch && ev.size(0) == p.batch &&
            ek.size(1) == ev.size(1) && ek.size(2) == p.kv_heads && ev.size(2) == p.kv_heads &&
            ek.size(3) == p.head_dim && ev.size(3) == p.value_dim,
        "tokenmix: additional keys/values must be [B, N, H_kv, D] and [B, N, H_kv, Dv]");
    p.num_extra = ek.size(1);
    p.extra_k = extra_view(ek, "additional_keys");
    p.extra_v = extra_view(ev, "additional_values");
  }
  return p;
}

// Outputs of the forward: out [B, *spatial, H, Dv] (q's dtype) and lse [B, *spatial, H]
// (float32; float64 for float64 inputs).
inline std::tuple<Tensor, Tensor> forward_outputs(const Tensor& q, const NeighborhoodProblem& p) {
  std::vector<int64_t> out_size = sizes_of(q);
  out_size.back() = p.value_dim;
  std::vector<int64_t> lse_size(out_size.begin(), out_size.end() - 1);
  Tensor out = new_empty_checked(q, out_size, std::nullopt, "the output");
  Tensor lse = new_empty_checked(q, lse_size, accumulation_type(q.scalar_type()), "lse");
  return {out, lse};
}

// Hidden like torch::stable::Tensor, which it holds.
struct __attribute__((visibility("hidden"))) BackwardOutputs {
  Tensor dq, dk, dv, drpb, dek, dev;
};

// Checks the backward-only inputs, allocates the (contiguous) gradients and fills in the
// backward fields of p. Returns false when there is nothing to compute (empty batch or heads).
inline bool prepare_backward(NeighborhoodProblem& p, BackwardOutputs& g, const Tensor& grad_out,
                             const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                             const Tensor& lse, const std::optional<Tensor>& rpb,
                             const std::optional<Tensor>& extra_k,
                             const std::optional<Tensor>& extra_v,
                             const std::optional<Tensor>& grad_lse, int rank) {
  STD_TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                  "tokenmix: grad_out and out must have q's dtype");
  STD_TORCH_CHECK(same_device(grad_out, q) && same_device(out, q) && same_device(lse, q),
                  "tokenmix: grad_out, out and lse must be on q's device");
  const auto acc_type = accumulation_type(q.scalar_type());
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
  const std::vector<int64_t> none{0};
  g.dq = new_empty_checked(q, sizes_of(q), std::nullopt, "grad_q");
  g.dk = new_empty_checked(k, sizes_of(k), std::nullopt, "grad_k");
  g.dv = new_empty_checked(v, sizes_of(v), std::nullopt, "grad_v");
  g.drpb = new_empty_checked(q, rpb.has_value() ? sizes_of(*rpb) : none, acc_type, "grad_rpb");
  g.dek = new_empty_checked(q, extra_k.has_value() ? sizes_of(*extra_k) : none, std::nullopt,
                            "grad_additional_keys");
  g.dev = new_empty_checked(q, extra_v.has_value() ? sizes_of(*extra_v) : none, std::nullopt,
                            "grad_additional_values");
  if (p.batch == 0 || p.heads == 0) {
    // No query attends anything (no batch or no query heads; k/v may still have heads): every
    // gradient is zero. Zeroed explicitly, as they are fresh uninitialized tensors.
    for (Tensor* t : {&g.dq, &g.dk, &g.dv, &g.drpb, &g.dek, &g.dev})
      if (t->numel() > 0) torch::stable::zero_(*t);
    return false;
  }
  p.out = spatial_view(out, rank, "out");
  p.grad_out = spatial_view(grad_out, rank, "grad_out");
  p.lse = lse.data_ptr();
  if (grad_lse.has_value()) {
    STD_TORCH_CHECK(grad_lse->scalar_type() == lse.scalar_type() && grad_lse->is_contiguous() &&
                        grad_lse->numel() == lse.numel() && same_device(*grad_lse, q),
                    "tokenmix: grad_lse must be a contiguous tensor like lse");
    p.grad_lse = grad_lse->data_ptr();
  }
  p.grad_q = spatial_view(g.dq, rank, "grad_q");
  p.grad_k.data = g.dk.data_ptr();
  p.grad_v.data = g.dv.data_ptr();
  p.grad_extra_k.data = g.dek.data_ptr();
  p.grad_extra_v.data = g.dev.data_ptr();
  p.grad_rpb = g.drpb.data_ptr();
  return true;
}

}  // namespace tokenmix::na_op
