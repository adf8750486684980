// Host entry point of the wgmma self-test GEMM (selftest_wgmma.cu). Pointers are host pointers
// under the emulator; under nvcc (sm_90a) the same source builds the GPU kernel.
#pragma once

#include <cstdint>

namespace tokenmix::simt_selftest {
#if defined(__CUDACC__)
inline namespace cuda {
#else
inline namespace emulated {
#endif

// Planted bugs of the wgmma GEMM, each reported by the emulator.
enum class wgmma_bug : int {
  none = 0,
  no_fence = 1,           // no wgmma_fence before the first wgmma
  no_wait = 2,            // the last group is never waited for
  overwrite_a = 3,        // A's tile is rewritten while the wgmma reads it
  touch_accumulator = 4,  // an accumulator register is changed while the wgmma is in flight
  no_proxy_fence = 5      // the first stage's tiles are stored without fence_proxy_async_shared
};

struct wgmma_gemm_config {
  bool bf16 = false;
  int n = 64;  // 16, 32, 64 or 128: one wgmma covers all of N
  bool a_in_registers = false;
  bool b_mn_major = false;  // B given K x N row major (else N x K row major, K-major)
  int swizzle = 1;          // layout::wgmma_swizzle: 0 none, 1 128-byte, 2 64-byte, 3 32-byte
  wgmma_bug bug = wgmma_bug::none;
};

// C[M x N] (f32) = A[M x K] B, with A row major and B as the config says (f16 or bf16 bit
// patterns); M % 64 == 0 and K % 64 == 0. One warpgroup per 64 rows.
void launch_wgmma_gemm(const wgmma_gemm_config& cfg, const uint16_t* a, const uint16_t* b, float* c,
                       int m, int k);

}  // namespace cuda / emulated
}  // namespace tokenmix::simt_selftest
