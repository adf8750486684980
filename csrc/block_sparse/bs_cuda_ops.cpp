// CUDA implementations of torch.ops.tokenmix.block_sparse_forward / block_sparse_backward: the
// block-sparse kernels of the CUDA attention engine (tokenmix/cuda/block_sparse_policy.h), built by
// nvcc (csrc/block_sparse/cuda/) and launched on torch's current CUDA stream. Compiled into
// tokenmix/_C.so when CMake finds nvcc.
#include <torch/csrc/stable/accelerator.h>

#include "bs_simt_op.h"
#include "tokenmix/current_stream.h"

namespace {

using namespace tokenmix::bs_op;

struct GpuBackend {
  void* stream;
  bool poison = false;
  int64_t workspace_words(const tokenmix::BlockSparseProblem& p, bool backward) const {
    return tokenmix::cuda::gpu::bs_workspace_words(p, backward);
  }
  void forward(const tokenmix::BlockSparseProblem& p, int32_t* workspace) const {
    tokenmix::cuda::gpu::bs_forward(p, workspace, stream);
  }
  void backward(const tokenmix::BlockSparseProblem& p, int32_t* workspace) const {
    tokenmix::cuda::gpu::bs_backward(p, workspace, stream);
  }
};

GpuBackend backend_for(const Tensor& q) {
  STD_TORCH_CHECK(q.is_cuda(), "tokenmix: CUDA kernel called with non-CUDA tensors");
  return GpuBackend{tokenmix::current_cuda_stream(q.get_device())};
}

std::tuple<Tensor, Tensor> block_sparse_forward_cuda(
    Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices,
    Tensor full_kv_num_blocks, Tensor full_kv_indices, IntList block_size,
    std::optional<Tensor> mask_bits, std::optional<Tensor> q_doc, std::optional<Tensor> kv_doc,
    IntList band, double scale) {
  const torch::stable::accelerator::DeviceGuard guard(q.get_device());  // kernels launch there
  const GpuBackend backend = backend_for(q);
  return simt_forward(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                      block_size, mask_bits, q_doc, kv_doc, band, scale, backend);
}

std::tuple<Tensor, Tensor, Tensor> block_sparse_backward_cuda(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor kv_num_blocks,
    Tensor kv_indices, Tensor full_kv_num_blocks, Tensor full_kv_indices, Tensor q_num_blocks,
    Tensor q_indices, Tensor q_slots, Tensor full_q_num_blocks, Tensor full_q_indices,
    IntList block_size, std::optional<Tensor> mask_bits, std::optional<Tensor> q_doc,
    std::optional<Tensor> kv_doc, IntList band, double scale, std::optional<Tensor> grad_lse,
    bool deterministic) {
  const torch::stable::accelerator::DeviceGuard guard(q.get_device());
  const GpuBackend backend = backend_for(q);
  return simt_backward(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, full_kv_num_blocks,
                       full_kv_indices, q_num_blocks, q_indices, q_slots, full_q_num_blocks,
                       full_q_indices, block_size, mask_bits, q_doc, kv_doc, band, scale, grad_lse,
                       deterministic, backend);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CUDA, m) {
  m.impl("block_sparse_forward", TORCH_BOX(&block_sparse_forward_cuda));
  m.impl("block_sparse_backward", TORCH_BOX(&block_sparse_backward_cuda));
}
