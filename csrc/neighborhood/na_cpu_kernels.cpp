// CPU kernels of generalized neighborhood attention, instantiated for every
// dtype. CMake compiles this file once per instruction set (TOKENMIX_ISA).
#include "tokenmix/cpu/isa_dispatch.h"
#include "tokenmix/cpu/neighborhood_kernels.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

void neighborhood_forward_cpu(const NeighborhoodProblem& p) {
  switch (p.dtype) {
    case DType::kFloat32: return neighborhood_forward<float, float>(p);
    case DType::kFloat64: return neighborhood_forward<double, double>(p);
    case DType::kFloat16: return neighborhood_forward<Half, float>(p);
    case DType::kBFloat16: return neighborhood_forward<BFloat16, float>(p);
  }
}

void neighborhood_backward_cpu(const NeighborhoodProblem& p) {
  switch (p.dtype) {
    case DType::kFloat32: return neighborhood_backward<float, float>(p);
    case DType::kFloat64: return neighborhood_backward<double, double>(p);
    case DType::kFloat16: return neighborhood_backward<Half, float>(p);
    case DType::kBFloat16: return neighborhood_backward<BFloat16, float>(p);
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
