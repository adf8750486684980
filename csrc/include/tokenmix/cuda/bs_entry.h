// Entry points of the block-sparse kernels of the CUDA attention engine, seen by the op layers.
// Built twice like the neighborhood-attention ones (na_entry.h): by nvcc into namespace gpu
// (tokenmix/_C.so) and by the host compiler into namespace emulated (the test library).
#pragma once

#include <cstdint>
#include <string>

#include "tokenmix/block_sparse_problem.h"
#include "tokenmix/cuda/engine_limits.h"

namespace tokenmix::cuda {

// Why the engine cannot run this problem ("" when it can). The op layer raises it as an error.
inline std::string bs_unsupported_reason(const BlockSparseProblem& p) {
  const int64_t longest = p.q_len > p.kv_len ? p.q_len : p.kv_len;
  const int64_t heads = p.heads > p.kv_heads ? p.heads : p.kv_heads;
  return engine_unsupported_reason("block-sparse attention", p.dtype, p.head_dim, p.value_dim,
                                   p.batch * longest * heads);
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
