// Plain-data views of tensors and the host thread-pool hook, shared by every
// problem descriptor (attention_problem.h, block_sparse_problem.h,
// linear_scan_problem.h). Kernel translation units never see a torch header:
// the op layer fills these in from stable-ABI tensors.
#pragma once

#include <cstdint>

#include "tokenmix/host_device.h"

namespace tokenmix {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

TM_HOST_DEVICE int64_t dtype_size(DType t) {
  return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2;
}

// A strided [B, S0, S1, S2, H, D] tensor (rank padded to 3 spatial dims).
// Additional tokens use the same view with S0 = S1 = 1 and S2 = N_extra.
struct StridedView {
  void* data = nullptr;
  int64_t stride[6] = {0, 0, 0, 0, 0, 1};  // in elements
};

// A strided [B, T, H, D] tensor (tokens in one sequence dimension), unit stride in D.
struct TokenView {
  void* data = nullptr;
  int64_t batch_stride = 0, token_stride = 0, head_stride = 0;  // in elements

  TM_HOST_DEVICE int64_t offset(int64_t b, int64_t t, int64_t h) const {
    return b * batch_stride + t * token_stride + h * head_stride;
  }
};

// Runs fn(begin, end, ctx) over [begin, end) on the host thread pool.
using ParallelForFn = void (*)(int64_t begin, int64_t end, int64_t grain,
                               void (*fn)(int64_t, int64_t, void*), void* ctx);

}  // namespace tokenmix
