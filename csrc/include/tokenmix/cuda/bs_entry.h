// Entry points of the block-sparse kernels of the CUDA attention engine, seen by the op layers.
// Built twice like the neighborhood-attention ones (na_entry.h): by nvcc into namespace gpu
// (tokenmix/_C.so) and by the host compiler into namespace emulated (the test library).
#pragma once

#include <cstdint>
#include <string>

#include "tokenmix/block_sparse_problem.h"

namespace tokenmix::cuda {

// Why the engine cannot run this problem ("" when it can). The op layer raises it as an error.
inline std::string bs_unsupported_reason(const BlockSparseProblem& p) {
  if (p.dtype == DType::kFloat64)
    return "float64 block-sparse attention has no CUDA kernel; use float32, float16 or bfloat16 "
           "(or run float64 on the CPU)";
  if (p.head_dim % 8 != 0 || p.head_dim > 256 || p.head_dim < 8)
    return "the CUDA kernels need a head dim (q.shape[-1]) that is a multiple of 8 in [8, 256], "
           "got " +
           std::to_string(p.head_dim);
  if (p.value_dim % 8 != 0 || p.value_dim > 256 || p.value_dim < 8)
    return "the CUDA kernels need a value head dim (v.shape[-1]) that is a multiple of 8 in "
           "[8, 256], got " +
           std::to_string(p.value_dim);
  const int64_t longest = p.q_len > p.kv_len ? p.q_len : p.kv_len;
  const int64_t heads = p.heads > p.kv_heads ? p.heads : p.kv_heads;
  if (p.batch * longest * heads >= (int64_t(1) << 31))
    return "the CUDA kernels index rows with 32-bit integers: batch * tokens * heads must be "
           "below 2^31";
  return "";
}

#define TOKENMIX_BS_ENTRY_POINTS                                                           \
  /* int32 words of workspace the forward (backward) needs: the tile schedules (and the */ \
  /* backward's delta, B * Tq * H floats). */                                              \
  int64_t bs_workspace_words(const BlockSparseProblem& p, bool backward);                  \
  /* Writes p.out and p.lse. */                                                            \
  void bs_forward(const BlockSparseProblem& p, int32_t* workspace, void* stream);          \
  /* Writes grad_q, grad_k, grad_v (no atomics: deterministic in either mode). */          \
  void bs_backward(const BlockSparseProblem& p, int32_t* workspace, void* stream);         \
  void bs_forward_f16(const BlockSparseProblem& p, int32_t* workspace, void* stream);      \
  void bs_forward_bf16(const BlockSparseProblem& p, int32_t* workspace, void* stream);     \
  void bs_forward_f32(const BlockSparseProblem& p, int32_t* workspace, void* stream);      \
  void bs_backward_f16(const BlockSparseProblem& p, int32_t* workspace, void* stream);     \
  void bs_backward_bf16(const BlockSparseProblem& p, int32_t* workspace, void* stream);    \
  void bs_backward_f32(const BlockSparseProblem& p, int32_t* workspace, void* stream);

namespace gpu {
TOKENMIX_BS_ENTRY_POINTS
}
namespace emulated {
TOKENMIX_BS_ENTRY_POINTS
}
#undef TOKENMIX_BS_ENTRY_POINTS

}  // namespace tokenmix::cuda
