// Dtype dispatch of the block-sparse entry points (see tokenmix/cuda/bs_entry.h).
#include "bs_instantiate.h"

namespace tokenmix::cuda::TOKENMIX_BS_BACKEND {

int64_t bs_workspace_words(const BlockSparseProblem& p, bool backward) {
  switch (p.dtype) {
    case DType::kFloat32: return bs_host::workspace_words<F32>(p, backward);
    case DType::kFloat16: return bs_host::workspace_words<F16>(p, backward);
    case DType::kBFloat16: return bs_host::workspace_words<BF16>(p, backward);
    default: throw std::runtime_error("tokenmix: " + bs_unsupported_reason(p));
  }
}

void bs_forward(const BlockSparseProblem& p, int32_t* workspace, void* stream) {
  switch (p.dtype) {
    case DType::kFloat16: return bs_forward_f16(p, workspace, stream);
    case DType::kBFloat16: return bs_forward_bf16(p, workspace, stream);
    case DType::kFloat32: return bs_forward_f32(p, workspace, stream);
    default: throw std::runtime_error("tokenmix: " + bs_unsupported_reason(p));
  }
}

void bs_backward(const BlockSparseProblem& p, int32_t* workspace, void* stream) {
  switch (p.dtype) {
    case DType::kFloat16: return bs_backward_f16(p, workspace, stream);
    case DType::kBFloat16: return bs_backward_bf16(p, workspace, stream);
    case DType::kFloat32: return bs_backward_f32(p, workspace, stream);
    default: throw std::runtime_error("tokenmix: " + bs_unsupported_reason(p));
  }
}

}  // namespace tokenmix::cuda::TOKENMIX_BS_BACKEND
