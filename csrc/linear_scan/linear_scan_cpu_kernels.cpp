// CPU kernels of the linear-attention scans, instantiated for every dtype and
// decay kind. CMake compiles this file once per instruction set.
#include "tokenmix/cpu/delta_rule_engine.h"
#include "tokenmix/cpu/isa_dispatch.h"
#include "tokenmix/cpu/linear_scan_engine.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

void linear_scan_cpu(const LinearScanProblem& p, bool backward) {
  switch (p.dtype) {
    case DType::kFloat32: return linear_scan_dispatch<float, float>(p, backward);
    case DType::kFloat64: return linear_scan_dispatch<double, double>(p, backward);
    case DType::kFloat16: return linear_scan_dispatch<Half, float>(p, backward);
    case DType::kBFloat16: return linear_scan_dispatch<BFloat16, float>(p, backward);
  }
}

void delta_rule_cpu(const LinearScanProblem& p, bool backward) {
  switch (p.dtype) {
    case DType::kFloat32: return delta_rule_impl<float, float>(p, backward);
    case DType::kFloat64: return delta_rule_impl<double, double>(p, backward);
    case DType::kFloat16: return delta_rule_impl<Half, float>(p, backward);
    case DType::kBFloat16: return delta_rule_impl<BFloat16, float>(p, backward);
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
