// The CUDA entry points of the linear-attention scans and the delta rule: the dtype switch over
// the kernels of tokenmix/cuda/linear_scan_kernels.h and delta_rule_kernels.h. nvcc builds this
// file into namespace gpu; the host compiler (csrc/emulated/linear_scan_emulated.cpp) into
// namespace emulated.
#include "tokenmix/cuda/linear_scan_launch.h"

#if defined(__CUDACC__)
#define TOKENMIX_SCAN_BACKEND gpu
#else
#define TOKENMIX_SCAN_BACKEND emulated
#endif

namespace tokenmix::cuda::TOKENMIX_SCAN_BACKEND {

namespace {
void run_scan(const LinearScanProblem& p, bool backward, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return scan_host::run<F32>(p, backward, stream);
    case DType::kFloat16: return scan_host::run<F16>(p, backward, stream);
    case DType::kBFloat16: return scan_host::run<BF16>(p, backward, stream);
    default: scan_host::require(p);  // float64: refused with the op's message
  }
}
}  // namespace

void linear_scan_forward(const LinearScanProblem& p, void* stream) {
  run_scan(p, false, stream);
}

void linear_scan_backward(const LinearScanProblem& p, void* stream) {
  run_scan(p, true, stream);
}

}  // namespace tokenmix::cuda::TOKENMIX_SCAN_BACKEND

#undef TOKENMIX_SCAN_BACKEND
