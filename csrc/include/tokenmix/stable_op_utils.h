// Helpers shared by the op layers (torch stable ABI only).
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>

#include "tokenmix/attention_problem.h"

namespace tokenmix {

inline DType to_dtype(torch::headeronly::ScalarType t) {
  using torch::headeronly::ScalarType;
  switch (t) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Double: return DType::kFloat64;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default:
      STD_TORCH_CHECK(false,
                      "tokenmix: unsupported dtype; use float32, float64, float16 or bfloat16");
  }
  return DType::kFloat32;
}

// Accumulation dtype of a problem in dtype t: float64 for float64, else float32.
inline torch::headeronly::ScalarType accumulation_type(torch::headeronly::ScalarType t) {
  using torch::headeronly::ScalarType;
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// ParallelForFn over torch's intra-op thread pool.
inline void host_parallel_for(int64_t begin, int64_t end, int64_t grain,
                              void (*fn)(int64_t, int64_t, void*), void* ctx) {
  torch::stable::parallel_for(begin, end, grain, [&](int64_t lo, int64_t hi) { fn(lo, hi, ctx); });
}

}  // namespace tokenmix
