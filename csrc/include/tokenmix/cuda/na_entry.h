// Entry points of the CUDA neighborhood-attention engine, seen by the op layers. The kernels are
// built twice: by nvcc for the GPU (namespace gpu, in tokenmix/_C.so) and by the host compiler for
// the SIMT emulator (namespace emulated, in the test library tokenmix/_emulated.so). Pointers in
// the problem are device pointers for gpu:: and host pointers for emulated::. The caller makes the
// tensors' device current (torch's DeviceGuard) and passes its current stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "tokenmix/attention_problem.h"
#include "tokenmix/cuda/engine_limits.h"
#include "tokenmix/neighborhood_schedule.h"

namespace tokenmix::cuda {

// Why the engine cannot run this problem ("" when it can). The op layer raises it as an error.
inline std::string unsupported_reason(const NeighborhoodProblem& p) {
  // num_extra counts rows too (the extra tokens' K/V rows).
  const int64_t rows =
      p.num_extra >= p.tokens() * p.heads * p.batch ? p.num_extra : p.tokens() * p.heads * p.batch;
  return engine_unsupported_reason("neighborhood attention", p.dtype, p.head_dim, p.value_dim,
                                   rows);
}

// The query tile shape the kernels use (also reported by tokenmix.plan).
constexpr int kQueryTileVolume = 64;

// Floats of backward workspace: delta (B * tokens * H), then, in deterministic mode with an rpb,
// one rpb partial per (batch, head, query tile).
inline int64_t backward_workspace_floats(const NeighborhoodProblem& p, bool deterministic) {
  int64_t floats = p.batch * p.tokens() * p.heads;
  if (deterministic && p.rpb) {
    int tile[3];
    choose_tile_shape(p.dims, kQueryTileVolume, tile);
    NeighborhoodSchedule s;
    s.init(p.dims, tile);
    floats += p.batch * p.heads * s.tiles_per_head() * p.rpb_size();
  }
  return floats;
}

#define TOKENMIX_NA_ENTRY_POINTS                                                             \
  /* Writes p.out and p.lse. */                                                              \
  void na_forward(const NeighborhoodProblem& p, void* stream);                               \
  /* Writes the gradients of p; grad_rpb must be zeroed (float atomics add into it unless */ \
  /* deterministic). workspace: backward_workspace_floats(p, deterministic) floats. */       \
  void na_backward(const NeighborhoodProblem& p, bool deterministic, float* workspace,       \
                   void* stream);                                                            \
  void na_forward_f16(const NeighborhoodProblem& p, void* stream);                           \
  void na_forward_bf16(const NeighborhoodProblem& p, void* stream);                          \
  void na_forward_f32(const NeighborhoodProblem& p, void* stream);                           \
  void na_backward_f16(const NeighborhoodProblem& p, bool deterministic, float* workspace,   \
                       void* stream);                                                        \
  void na_backward_bf16(const NeighborhoodProblem& p, bool deterministic, float* workspace,  \
                        void* stream);                                                       \
  void na_backward_f32(const NeighborhoodProblem& p, bool deterministic, float* workspace,   \
                       void* stream);

namespace gpu {
TOKENMIX_NA_ENTRY_POINTS
// The sm_90a (wgmma) forward (fp16 / bf16, D = Dv in {32, 64, 128}), for compute capability 9.0;
// built when 90 is among the build's architectures (TOKENMIX_HAS_SM90A).
void na_forward_wg_f16(const NeighborhoodProblem& p, void* stream);
void na_forward_wg_bf16(const NeighborhoodProblem& p, void* stream);
}  // namespace gpu
namespace emulated {
TOKENMIX_NA_ENTRY_POINTS
}
#undef TOKENMIX_NA_ENTRY_POINTS

}  // namespace tokenmix::cuda
