// The sm_90a (wgmma) forward, fp16 and bf16. CMakeLists.txt compiles this file for sm_90a alone
// (its code runs on compute capability 9.0 only); the forward of na_forward_{f16,bf16}.cu calls
// it there (take_wgmma_forward in tokenmix/cuda/na_launch.h). The emulator builds the same path
// into its own forward (TOKENMIX_SIMT_ARCH=sm_90a).
#include "tokenmix/cuda/na_launch.h"

namespace tokenmix::cuda::gpu {
void na_forward_wg_f16(const NeighborhoodProblem& p, void* stream) {
  forward_wg<F16>(p, stream_t(stream));
}
void na_forward_wg_bf16(const NeighborhoodProblem& p, void* stream) {
  forward_wg<BF16>(p, stream_t(stream));
}
}  // namespace tokenmix::cuda::gpu
