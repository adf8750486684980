// What the CUDA attention engine supports, shared by the entry points of every policy
// (na_entry.h, bs_entry.h): the checks the op layers turn into errors.
#pragma once

#include <cstdint>
#include <string>

#include "tokenmix/tensor_view.h"

namespace tokenmix::cuda {

// Why the engine cannot run a problem of `family` ("neighborhood attention", ...) with these
// dtype, head dims and row count ("" when it can).
inline std::string engine_unsupported_reason(const char* family, DType dtype, int64_t head_dim,
                                             int64_t value_dim, int64_t rows) {
  if (dtype == DType::kFloat64)
    return std::string("float64 ") + family +
           " has no CUDA kernel; use float32, float16 or bfloat16 (or run float64 on the CPU)";
  if (head_dim % 8 != 0 || head_dim > 256 || head_dim < 8)
    return "the CUDA kernels need a head dim (q.shape[-1]) that is a multiple of 8 in [8, 256], "
           "got " +
           std::to_string(head_dim);
  if (value_dim % 8 != 0 || value_dim > 256 || value_dim < 8)
    return "the CUDA kernels need a value head dim (v.shape[-1]) that is a multiple of 8 in "
           "[8, 256], got " +
           std::to_string(value_dim);
  if (rows >= (int64_t(1) << 31))
    return "the CUDA kernels index rows with 32-bit integers: batch * tokens * heads must be "
           "below 2^31";
  return "";
}

}  // namespace tokenmix::cuda
