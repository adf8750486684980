// CPU kernels of block-sparse attention, instantiated for every dtype. CMake
// compiles this file once per instruction set (TOKENMIX_ISA).
#include "tokenmix/cpu/block_sparse_kernels.h"
#include "tokenmix/cpu/isa_dispatch.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

void block_sparse_forward_cpu(const BlockSparseProblem& p) {
  switch (p.dtype) {
    case DType::kFloat32: return block_sparse_forward<float, float>(p);
    case DType::kFloat64: return block_sparse_forward<double, double>(p);
    case DType::kFloat16: return block_sparse_forward<Half, float>(p);
    case DType::kBFloat16: return block_sparse_forward<BFloat16, float>(p);
  }
}

void block_sparse_backward_cpu(const BlockSparseProblem& p) {
  switch (p.dtype) {
    case DType::kFloat32: return block_sparse_backward<float, float>(p);
    case DType::kFloat64: return block_sparse_backward<double, double>(p);
    case DType::kFloat16: return block_sparse_backward<Half, float>(p);
    case DType::kBFloat16: return block_sparse_backward<BFloat16, float>(p);
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
