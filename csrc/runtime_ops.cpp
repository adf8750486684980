// Build and runtime facts for `python -m tokenmix info`.
#include <torch/csrc/stable/library.h>

#include <cstring>

#include "tokenmix/cpu/isa_dispatch.h"

namespace {
// 0 = generic (SSE2), 1 = AVX2, 2 = AVX-512: the CPU kernels in use.
int64_t cpu_isa() {
  const char* isa = tokenmix::cpu::selected_isa();
  if (std::strcmp(isa, "avx512") == 0) return 2;
  if (std::strcmp(isa, "avx2") == 0) return 1;
  return 0;
}
}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  m.def("cpu_isa() -> int");
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", TORCH_BOX(&cpu_isa));
}
