// Build and runtime facts for `python -m tokenmix info`, and the CPU kernels' buffer cache.
#include <torch/csrc/stable/library.h>

#include <cstring>

#include "tokenmix/cpu/isa_dispatch.h"
#include "tokenmix/cpu/large_block_cache.h"

namespace {
// 0 = generic (SSE2), 1 = AVX2, 2 = AVX-512: the CPU kernels in use.
int64_t cpu_isa() {
  const char* isa = tokenmix::cpu::selected_isa();
  if (std::strcmp(isa, "avx512") == 0) return 2;
  if (std::strcmp(isa, "avx2") == 0) return 1;
  return 0;
}

// The large-block cache of the CPU kernels (tokenmix/cpu/large_block_cache.h).
int64_t cpu_cached_bytes() {
  return int64_t(tokenmix::cpu::cached_large_block_bytes());
}
int64_t cpu_empty_cache() {
  return int64_t(tokenmix::cpu::release_large_blocks());
}
}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  m.def("cpu_isa() -> int");
  m.def("cpu_cached_bytes() -> int");
  m.def("cpu_empty_cache() -> int");
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", TORCH_BOX(&cpu_isa));
  m.impl("cpu_cached_bytes", TORCH_BOX(&cpu_cached_bytes));
  m.impl("cpu_empty_cache", TORCH_BOX(&cpu_empty_cache));
}
