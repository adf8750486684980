// tokenmix::block_sparse_forward / block_sparse_backward on the CUDA engine (tokenmix/cuda/),
// shared by the CUDA implementation (bs_cuda_ops.cpp: kernels built by nvcc, current CUDA stream)
// and the emulated one of the test library (csrc/emulated/: the same kernel source on the SIMT
// emulator, CPU tensors). The emulated one poisons every output with NaN first, so an element the
// kernels fail to write cannot pass a test.
#pragma once

#include <limits>
#include <string>
#include <vector>

#include "bs_op_common.h"
#include "tokenmix/cuda/bs_entry.h"

namespace tokenmix::bs_op {

// The kernels copy rows 16 bytes at a time: inputs whose rows are not aligned are copied.
inline void align_inputs(Tensor& q, Tensor& k, Tensor& v) {
  q = aligned_rows(q);
  k = aligned_rows(k);
  v = aligned_rows(v);
}

inline void check_supported(const BlockSparseProblem& p) {
  const std::string reason = cuda::bs_unsupported_reason(p);
  STD_TORCH_CHECK(reason.empty(), "tokenmix: ", reason);
}

inline Tensor workspace_for(const Tensor& q, int64_t words) {
  return new_empty_checked(q, std::vector<int64_t>{std::max<int64_t>(words, 1)}, ScalarType::Int,
                           "the block-sparse workspace");
}

// Backend: struct with forward(p, ws), backward(p, ws), workspace_words(p, backward) and a
// `poison` flag.
template <class Backend>
std::tuple<Tensor, Tensor> simt_forward(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks,
                                        Tensor kv_indices, Tensor full_kv_num_blocks,
                                        Tensor full_kv_indices, IntList block_size,
                                        std::optional<Tensor> mask_bits,
                                        std::optional<Tensor> q_doc, std::optional<Tensor> kv_doc,
                                        IntList band, double scale, const Backend& backend) {
  check_supported(make_problem(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                               full_kv_indices, block_size, mask_bits, q_doc, kv_doc, band, scale));
  align_inputs(q, k, v);
  auto p = make_problem(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                        block_size, mask_bits, q_doc, kv_doc, band, scale);
  auto [out, lse] = forward_outputs(q, p);
  if (lse.numel() == 0) return {out, lse};  // nothing to compute (out is empty too)
  if (backend.poison) {
    torch::stable::fill_(out, std::numeric_limits<double>::quiet_NaN());
    torch::stable::fill_(lse, std::numeric_limits<double>::quiet_NaN());
  }
  p.out = token_view(out, "out");
  p.lse = lse.data_ptr();
  Tensor workspace = workspace_for(q, backend.workspace_words(p, false));
  backend.forward(p, static_cast<int32_t*>(workspace.data_ptr()));
  return {out, lse};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> simt_backward(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor kv_num_blocks,
    Tensor kv_indices, Tensor full_kv_num_blocks, Tensor full_kv_indices, Tensor q_num_blocks,
    Tensor q_indices, Tensor q_slots, Tensor full_q_num_blocks, Tensor full_q_indices,
    IntList block_size, std::optional<Tensor> mask_bits, std::optional<Tensor> q_doc,
    std::optional<Tensor> kv_doc, IntList band, double scale, std::optional<Tensor> grad_lse,
    bool deterministic, const Backend& backend) {
  check_supported(make_problem(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                               full_kv_indices, block_size, mask_bits, q_doc, kv_doc, band, scale));
  align_inputs(q, k, v);
  grad_out = aligned_rows(grad_out);
  out = aligned_rows(out);
  auto p = make_problem(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                        block_size, mask_bits, q_doc, kv_doc, band, scale);
  BackwardOutputs g;
  if (!prepare_backward(p, g, grad_out, q, k, v, out, lse, q_num_blocks, q_indices, q_slots,
                        full_q_num_blocks, full_q_indices, grad_lse, deterministic))
    return {g.dq, g.dk, g.dv};
  if (backend.poison)
    for (Tensor* t : {&g.dq, &g.dk, &g.dv})
      if (t->numel() > 0) torch::stable::fill_(*t, std::numeric_limits<double>::quiet_NaN());
  Tensor workspace = workspace_for(q, backend.workspace_words(p, true));
  backend.backward(p, static_cast<int32_t*>(workspace.data_ptr()));
  return {g.dq, g.dk, g.dv};
}

}  // namespace tokenmix::bs_op
