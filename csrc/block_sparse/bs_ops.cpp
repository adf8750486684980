// torch.ops.tokenmix.block_sparse_forward / block_sparse_backward: the op schemas and the CPU
// implementations, registered through PyTorch's stable C ABI (the CUDA ones are in
// bs_cuda_ops.cpp). Argument checks are shared (bs_op_common.h).
#include "bs_op_common.h"
#include "bs_schemas.h"
#include "tokenmix/cpu/isa_dispatch.h"

using namespace tokenmix::bs_op;

namespace {

std::tuple<Tensor, Tensor> block_sparse_forward_cpu(
    Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices,
    Tensor full_kv_num_blocks, Tensor full_kv_indices, IntList block_size,
    std::optional<Tensor> mask_bits, std::optional<Tensor> q_doc, std::optional<Tensor> kv_doc,
    IntList band, double scale) {
  STD_TORCH_CHECK(q.is_cpu(), "tokenmix: CPU kernel called with non-CPU tensors");
  auto p = make_problem(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                        block_size, mask_bits, q_doc, kv_doc, band, scale);
  auto [out, lse] = forward_outputs(q, p);
  if (lse.numel() == 0) return {out, lse};  // nothing to compute (out is empty too)
  p.out = token_view(out, "out");
  p.lse = lse.data_ptr();
  p.parallel_for = tokenmix::host_parallel_for;
  p.num_threads = int(torch::stable::get_num_threads());
  tokenmix::cpu::block_sparse_forward(p);
  return {out, lse};
}

// The CPU backward is always deterministic; `deterministic` matters on CUDA only.
std::tuple<Tensor, Tensor, Tensor> block_sparse_backward_cpu(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor kv_num_blocks,
    Tensor kv_indices, Tensor full_kv_num_blocks, Tensor full_kv_indices, Tensor q_num_blocks,
    Tensor q_indices, Tensor q_slots, Tensor full_q_num_blocks, Tensor full_q_indices,
    IntList block_size, std::optional<Tensor> mask_bits, std::optional<Tensor> q_doc,
    std::optional<Tensor> kv_doc, IntList band, double scale, std::optional<Tensor> grad_lse,
    bool deterministic) {
  STD_TORCH_CHECK(q.is_cpu(), "tokenmix: CPU kernel called with non-CPU tensors");
  auto p = make_problem(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                        block_size, mask_bits, q_doc, kv_doc, band, scale);
  BackwardOutputs g;
  if (prepare_backward(p, g, grad_out, q, k, v, out, lse, q_num_blocks, q_indices, q_slots,
                       full_q_num_blocks, full_q_indices, grad_lse, deterministic)) {
    p.parallel_for = tokenmix::host_parallel_for;
    p.num_threads = int(torch::stable::get_num_threads());
    tokenmix::cpu::block_sparse_backward(p);
  }
  return {g.dq, g.dk, g.dv};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  m.def(kForwardSchema);
  m.def(kBackwardSchema);
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("block_sparse_forward", TORCH_BOX(&block_sparse_forward_cpu));
  m.impl("block_sparse_backward", TORCH_BOX(&block_sparse_backward_cpu));
}
