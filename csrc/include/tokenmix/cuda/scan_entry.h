// Entry points of the CUDA linear-attention scans, seen by the op layers. Built twice like the
// other families' (fft_entry.h): by nvcc into namespace gpu (tokenmix/_C.so) and by the host
// compiler into namespace emulated (the test library).
#pragma once

#include <cstdint>
#include <string>

#include "tokenmix/cuda/scan_layout.h"
#include "tokenmix/linear_scan_problem.h"

namespace tokenmix::cuda {

// Why the CUDA scans cannot run this problem ("" when they can).
inline std::string linear_scan_unsupported_reason(const LinearScanProblem& p) {
  if (p.dtype == DType::kFloat64)
    return p.delta_rule ? "tokenmix: the delta rule on CUDA takes float32, float16 or bfloat16"
                        : "tokenmix: the linear scans on CUDA take float32, float16 or bfloat16";
  if (p.key_dim > kLinearScanCudaMaxKeyDim)
    return std::string("tokenmix: ") + (p.delta_rule ? "the delta rule" : "the linear scans") +
           " on CUDA take head dims K of at most " + std::to_string(kLinearScanCudaMaxKeyDim) +
           ", got " + std::to_string(p.key_dim);
  return "";
}

// Floats of the float32 workspace the op allocates for a backward call (scan_workspace); the
// forward needs none. The largest head dim, kLinearScanCudaMaxKeyDim (the state slice [K x 32]
// lives in shared memory), is mirrored by tokenmix.linear_scan.ops.CUDA_MAX_KEY_DIM.
inline int64_t linear_scan_cuda_workspace_floats(const LinearScanProblem& p) {
  return scan_workspace(p).total;
}

// Both serve the linear scans and the delta rule (LinearScanProblem::delta_rule).
#define TOKENMIX_SCAN_ENTRY_POINTS                                    \
  void linear_scan_forward(const LinearScanProblem& p, void* stream); \
  void linear_scan_backward(const LinearScanProblem& p, void* stream);

namespace gpu {
TOKENMIX_SCAN_ENTRY_POINTS
}
namespace emulated {
TOKENMIX_SCAN_ENTRY_POINTS
}
#undef TOKENMIX_SCAN_ENTRY_POINTS

}  // namespace tokenmix::cuda
