// Dtype dispatch of the CUDA neighborhood-attention entry points (see tokenmix/cuda/na_entry.h).
#include "na_instantiate.h"

namespace tokenmix::cuda::TOKENMIX_NA_BACKEND {

void na_forward(const NeighborhoodProblem& p, void* stream) {
  switch (p.dtype) {
    case DType::kFloat16: return na_forward_f16(p, stream);
    case DType::kBFloat16: return na_forward_bf16(p, stream);
    case DType::kFloat32: return na_forward_f32(p, stream);
    default: throw std::runtime_error("tokenmix: " + unsupported_reason(p));
  }
}

void na_backward(const NeighborhoodProblem& p, bool deterministic, float* workspace, void* stream) {
  switch (p.dtype) {
    case DType::kFloat16: return na_backward_f16(p, deterministic, workspace, stream);
    case DType::kBFloat16: return na_backward_bf16(p, deterministic, workspace, stream);
    case DType::kFloat32: return na_backward_f32(p, deterministic, workspace, stream);
    default: throw std::runtime_error("tokenmix: " + unsupported_reason(p));
  }
}

}  // namespace tokenmix::cuda::TOKENMIX_NA_BACKEND
