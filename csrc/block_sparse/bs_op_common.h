// Argument checking, output allocation and problem building shared by every implementation of
// tokenmix::block_sparse_forward / block_sparse_backward (CPU, CUDA and the emulated CUDA kernels
// of the test library). Torch stable ABI only. Users hit the checks of
// tokenmix/block_sparse/layout.py first; these guard direct calls of the ops, so that a bad call
// raises instead of reading out of bounds.
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

#include "tokenmix/block_sparse_problem.h"
#include "tokenmix/stable_op_utils.h"

namespace tokenmix::bs_op {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using IntList = torch::headeronly::HeaderOnlyArrayRef<int64_t>;

// [B, T, H, D] with unit stride in D.
inline TokenView token_view(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.dim() == 4, "tokenmix: ", name, " must be [B, T, H, D], got ", t.dim(),
                  " dimensions");
  STD_TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "tokenmix: ", name,
                  " must have unit stride in its last dimension");
  TokenView v;
  v.data = t.data_ptr();
  v.batch_stride = t.stride(0);
  v.token_stride = t.stride(1);
  v.head_stride = t.stride(2);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// An int32 layout tensor on q's device, contiguous, of the given sizes.
inline const int32_t* layout_tensor(const Tensor& t, const Tensor& q, const char* name,
                                    std::initializer_list<int64_t> sizes) {
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Int, "tokenmix: ", name, " must be int32");
  STD_TORCH_CHECK(same_device(t, q), "tokenmix: ", name, " must be on q's device");
  STD_TORCH_CHECK(t.is_contiguous(), "tokenmix: ", name, " must be contiguous");
  STD_TORCH_CHECK(t.dim() == int64_t(sizes.size()), "tokenmix: ", name, " must have ", sizes.size(),
                  " dimensions, got ", t.dim());
  int i = 0;
  for (const int64_t n : sizes) {
    if (n >= 0)
      STD_TORCH_CHECK(t.size(i) == n, "tokenmix: ", name, " has size ", t.size(i), " in dimension ",
                      i, ", expected ", n);
    ++i;
  }
  return static_cast<const int32_t*>(t.data_ptr());
}

// Counts in [0, max] and the listed indices in [0, limit); only for host memory.
inline void check_lists(const int32_t* count, const int32_t* index, int64_t rows, int64_t max,
                        int64_t limit, const char* count_name, const char* index_name) {
  for (int64_t r = 0; r < rows; ++r) {
    STD_TORCH_CHECK(count[r] >= 0 && count[r] <= max, "tokenmix: ", count_name, " holds ", count[r],
                    ", outside [0, ", max, "]");
    for (int64_t s = 0; s < count[r]; ++s) {
      const int32_t i = index[r * max + s];
      STD_TORCH_CHECK(i >= 0 && i < limit, "tokenmix: ", index_name, " holds block index ", i,
                      ", outside [0, ", limit, ")");
    }
  }
}

// The problem and its kv-side layout. Layout data is range-checked when it is in host memory; on
// CUDA, tokenmix.BlockLayout checks it once when it is built.
inline BlockSparseProblem make_problem(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kv_num_blocks,
    const Tensor& kv_indices, const Tensor& full_kv_num_blocks, const Tensor& full_kv_indices,
    IntList block_size, const std::optional<Tensor>& mask_bits, const std::optional<Tensor>& q_doc,
    const std::optional<Tensor>& kv_doc, IntList band, double scale) {
  STD_TORCH_CHECK(same_device(q, k) && same_device(q, v),
                  "tokenmix: q, k and v must be on the same device");
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                  "tokenmix: q, k and v must have the same dtype");
  STD_TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                  "tokenmix: q, k and v must be [B, T, H, D]");
  check_scale(scale);
  BlockSparseProblem p;
  p.dtype = to_dtype(q.scalar_type());
  p.batch = q.size(0);
  p.q_len = q.size(1);
  p.heads = q.size(2);
  p.head_dim = q.size(3);
  p.kv_len = k.size(1);
  p.kv_heads = k.size(2);
  p.value_dim = v.size(3);
  STD_TORCH_CHECK(k.size(0) == p.batch && v.size(0) == p.batch,
                  "tokenmix: batch sizes of q, k, v differ");
  STD_TORCH_CHECK(v.size(1) == p.kv_len, "tokenmix: k and v sequence lengths differ");
  STD_TORCH_CHECK(k.size(3) == p.head_dim, "tokenmix: k head dim differs from q head dim");
  STD_TORCH_CHECK(p.head_dim >= 1, "tokenmix: the head dim of q and k (D) must be >= 1, got ",
                  p.head_dim);
  STD_TORCH_CHECK(v.size(2) == p.kv_heads, "tokenmix: k and v head counts differ");
  STD_TORCH_CHECK(p.kv_heads > 0 && p.heads % p.kv_heads == 0,
                  "tokenmix: q heads must be a multiple of k/v heads");
  const int64_t feature = std::max<int64_t>({int64_t(1), p.head_dim, p.value_dim});
  const int64_t rows = checked_mul(checked_mul(p.batch, std::max(p.q_len, p.kv_len), "B * T"),
                                   std::max(p.heads, p.kv_heads), "B * T * heads");
  checked_mul(rows, feature, "B * T * heads * head dim");
  p.scale = scale;
  p.q = token_view(q, "q");
  p.k = token_view(k, "k");
  p.v = token_view(v, "v");

  BlockLayoutView& l = p.layout;
  STD_TORCH_CHECK(block_size.size() == 2 && block_size[0] >= 1 && block_size[1] >= 1 &&
                      block_size[0] <= (int64_t(1) << 20) && block_size[1] <= (int64_t(1) << 20),
                  "tokenmix: block_size must be [q_block, kv_block], each in [1, 2^20]");
  l.q_block = int(block_size[0]);
  l.kv_block = int(block_size[1]);
  const int64_t nq = ceil_div(p.q_len, l.q_block), nk = ceil_div(p.kv_len, l.kv_block);
  STD_TORCH_CHECK(nq < (int64_t(1) << 31) && nk < (int64_t(1) << 31),
                  "tokenmix: too many blocks for int32 block indices");
  l.num_q_blocks = int(nq);
  l.num_kv_blocks = int(nk);
  STD_TORCH_CHECK(kv_num_blocks.dim() == 3,
                  "tokenmix: kv_num_blocks must be [LB, LH, num_q_blocks]");
  l.batch = kv_num_blocks.size(0);
  l.heads = kv_num_blocks.size(1);
  STD_TORCH_CHECK(l.batch == 1 || l.batch == p.batch, "tokenmix: the layout's batch size ", l.batch,
                  " must be 1 or q's batch size ", p.batch);
  STD_TORCH_CHECK(l.heads == 1 || l.heads == p.heads || l.heads == p.kv_heads,
                  "tokenmix: the layout's head count ", l.heads, " must be 1, k's head count ",
                  p.kv_heads, " or q's head count ", p.heads);
  l.head_group = l.heads > 1 ? p.heads / l.heads : 1;
  l.partial_count = layout_tensor(kv_num_blocks, q, "kv_num_blocks", {l.batch, l.heads, nq});
  STD_TORCH_CHECK(kv_indices.dim() == 4,
                  "tokenmix: kv_indices must be [LB, LH, num_q_blocks, max]");
  l.max_partial = int(kv_indices.size(3));
  l.partial_index = layout_tensor(kv_indices, q, "kv_indices", {l.batch, l.heads, nq, -1});
  l.full_count = layout_tensor(full_kv_num_blocks, q, "full_kv_num_blocks", {l.batch, l.heads, nq});
  STD_TORCH_CHECK(full_kv_indices.dim() == 4,
                  "tokenmix: full_kv_indices must be [LB, LH, num_q_blocks, max]");
  l.max_full = int(full_kv_indices.size(3));
  l.full_index = layout_tensor(full_kv_indices, q, "full_kv_indices", {l.batch, l.heads, nq, -1});
  const int64_t layout_rows = l.batch * l.heads * nq;
  if (q.is_cpu()) {
    check_lists(l.partial_count, l.partial_index, layout_rows, l.max_partial, nk, "kv_num_blocks",
                "kv_indices");
    check_lists(l.full_count, l.full_index, layout_rows, l.max_full, nk, "full_kv_num_blocks",
                "full_kv_indices");
  }

  ElementMask& m = l.mask;
  STD_TORCH_CHECK(band.size() == 0 || band.size() == 3 || band.size() == 4,
                  "tokenmix: band must be [], [lo, hi, prefix] or [lo, hi, prefix, prefix_causal]");
  if (band.size() >= 3) {
    m.has_band = true;
    m.band_lo = band[0];
    m.band_hi = band[1];
    m.prefix = band[2];
    STD_TORCH_CHECK(band.size() == 3 || band[3] == 0 || band[3] == 1,
                    "tokenmix: band[3] (prefix_causal) must be 0 or 1, got ",
                    band.size() == 4 ? band[3] : 0);
    m.prefix_causal = band.size() == 4 && band[3] == 1;
  }
  STD_TORCH_CHECK(q_doc.has_value() == kv_doc.has_value(),
                  "tokenmix: q_doc and kv_doc must be given together");
  if (q_doc.has_value()) {
    STD_TORCH_CHECK(q_doc->dim() == 2 && kv_doc->dim() == 2 && q_doc->size(0) == kv_doc->size(0) &&
                        (q_doc->size(0) == 1 || q_doc->size(0) == p.batch),
                    "tokenmix: q_doc and kv_doc must be [1 or B, Tq] and [1 or B, Tk]");
    m.doc_batch = q_doc->size(0);
    m.q_doc = layout_tensor(*q_doc, q, "q_doc", {m.doc_batch, p.q_len});
    m.kv_doc = layout_tensor(*kv_doc, q, "kv_doc", {m.doc_batch, p.kv_len});
  }
  if (mask_bits.has_value()) {
    m.words = int(ceil_div(l.kv_block, 32));
    m.bits = reinterpret_cast<const uint32_t*>(layout_tensor(
        *mask_bits, q, "mask_bits", {l.batch, l.heads, nq, l.max_partial, l.q_block, m.words}));
  }
  return p;
}

// Outputs of the forward: out [B, Tq, H, Dv] (q's dtype) and lse [B, Tq, H] (float32; float64
// for float64 inputs).
inline std::tuple<Tensor, Tensor> forward_outputs(const Tensor& q, const BlockSparseProblem& p) {
  Tensor out =
      new_empty_checked(q, {p.batch, p.q_len, p.heads, p.value_dim}, std::nullopt, "the output");
  Tensor lse =
      new_empty_checked(q, {p.batch, p.q_len, p.heads}, accumulation_type(q.scalar_type()), "lse");
  return {out, lse};
}

// Hidden like torch::stable::Tensor, which it holds.
struct __attribute__((visibility("hidden"))) BackwardOutputs {
  Tensor dq, dk, dv;
};

// Checks the backward-only inputs (the q-side layout included), allocates the contiguous
// gradients and fills in the backward fields of p. Returns false when there is nothing to compute
// (the gradients are then zero).
inline bool prepare_backward(BlockSparseProblem& p, BackwardOutputs& g, const Tensor& grad_out,
                             const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                             const Tensor& lse, const Tensor& q_num_blocks, const Tensor& q_indices,
                             const Tensor& q_slots, const Tensor& full_q_num_blocks,
                             const Tensor& full_q_indices, const std::optional<Tensor>& grad_lse,
                             bool deterministic) {
  STD_TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                  "tokenmix: grad_out and out must have q's dtype");
  STD_TORCH_CHECK(same_device(grad_out, q) && same_device(out, q) && same_device(lse, q),
                  "tokenmix: grad_out, out and lse must be on q's device");
  const auto acc_type = accumulation_type(q.scalar_type());
  STD_TORCH_CHECK(lse.scalar_type() == acc_type && lse.is_contiguous() && lse.dim() == 3 &&
                      lse.size(0) == p.batch && lse.size(1) == p.q_len && lse.size(2) == p.heads,
                  "tokenmix: lse must be a contiguous [B, Tq, H] tensor, float32 (float64 for "
                  "float64 inputs)");
  for (const Tensor* t : {&grad_out, &out})
    STD_TORCH_CHECK(t->dim() == 4 && t->size(0) == p.batch && t->size(1) == p.q_len &&
                        t->size(2) == p.heads && t->size(3) == p.value_dim,
                    "tokenmix: grad_out and out must have the output's shape [B, Tq, H, Dv]");
  BlockLayoutView& l = p.layout;
  const int64_t nk = l.num_kv_blocks;
  l.q_partial_count = layout_tensor(q_num_blocks, q, "q_num_blocks", {l.batch, l.heads, nk});
  STD_TORCH_CHECK(q_indices.dim() == 4, "tokenmix: q_indices must be [LB, LH, num_kv_blocks, max]");
  l.max_q_partial = int(q_indices.size(3));
  l.q_partial_index = layout_tensor(q_indices, q, "q_indices", {l.batch, l.heads, nk, -1});
  l.q_partial_slot =
      layout_tensor(q_slots, q, "q_slots", {l.batch, l.heads, nk, int64_t(l.max_q_partial)});
  l.q_full_count = layout_tensor(full_q_num_blocks, q, "full_q_num_blocks", {l.batch, l.heads, nk});
  STD_TORCH_CHECK(full_q_indices.dim() == 4,
                  "tokenmix: full_q_indices must be [LB, LH, num_kv_blocks, max]");
  l.max_q_full = int(full_q_indices.size(3));
  l.q_full_index = layout_tensor(full_q_indices, q, "full_q_indices", {l.batch, l.heads, nk, -1});
  if (q.is_cpu()) {
    const int64_t rows = l.batch * l.heads * nk;
    check_lists(l.q_partial_count, l.q_partial_index, rows, l.max_q_partial, l.num_q_blocks,
                "q_num_blocks", "q_indices");
    check_lists(l.q_full_count, l.q_full_index, rows, l.max_q_full, l.num_q_blocks,
                "full_q_num_blocks", "full_q_indices");
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t s = 0; s < l.q_partial_count[r]; ++s) {
        const int32_t slot = l.q_partial_slot[r * l.max_q_partial + s];
        STD_TORCH_CHECK(slot >= 0 && slot < std::max(l.max_partial, 1), "tokenmix: q_slots holds ",
                        slot, ", outside [0, ", l.max_partial, ")");
      }
  }
  g.dq = new_empty_checked(q, sizes_of(q), std::nullopt, "grad_q");
  g.dk = new_empty_checked(k, sizes_of(k), std::nullopt, "grad_k");
  g.dv = new_empty_checked(v, sizes_of(v), std::nullopt, "grad_v");
  if (p.batch == 0 || p.heads == 0 || p.q_len == 0 || p.kv_len == 0) {
    for (Tensor* t : {&g.dq, &g.dk, &g.dv})
      if (t->numel() > 0) torch::stable::zero_(*t);
    return false;
  }
  p.out = token_view(out, "out");
  p.grad_out = token_view(grad_out, "grad_out");
  p.lse = lse.data_ptr();
  if (grad_lse.has_value()) {
    STD_TORCH_CHECK(grad_lse->scalar_type() == lse.scalar_type() && grad_lse->is_contiguous() &&
                        grad_lse->numel() == lse.numel() && same_device(*grad_lse, q),
                    "tokenmix: grad_lse must be a contiguous tensor like lse");
    p.grad_lse = grad_lse->data_ptr();
  }
  p.grad_q = token_view(g.dq, "grad_q");
  p.grad_k = token_view(g.dk, "grad_k");
  p.grad_v = token_view(g.dv, "grad_v");
  p.deterministic = deterministic;
  return true;
}

}  // namespace tokenmix::bs_op
