// Helpers shared by the op layers (torch stable ABI only).
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "tokenmix/tensor_view.h"

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

// The scale argument of an op: any finite double (nan or inf would make every output nan).
inline void check_scale(double scale) {
  STD_TORCH_CHECK(std::isfinite(scale), "tokenmix: scale must be finite, got ", scale);
}

// Bytes per element of the dtypes the ops allocate (8 for any other: an upper bound).
inline int64_t element_size(torch::headeronly::ScalarType t) {
  using torch::headeronly::ScalarType;
  switch (t) {
    case ScalarType::Bool:
    case ScalarType::Byte:
    case ScalarType::Char: return 1;
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Short: return 2;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    default: return 8;
  }
}

// "[2, 3, 4]".
inline std::string shape_string(torch::headeronly::IntHeaderOnlyArrayRef size) {
  std::string s = "[";
  for (size_t i = 0; i < size.size(); ++i) s += (i ? ", " : "") + std::to_string(size[i]);
  return s + "]";
}

// The one allocation path of the ops: torch::stable::new_empty (a tensor on `like`'s device,
// of `dtype`, default `like`'s), with errors that say what ran out. Through the stable ABI a
// failed allocation only reports "API call failed"; here it says that memory ran out, for which
// output (`what`) and how many bytes were asked for. Sizes whose byte count overflows int64 are
// refused before asking.
inline torch::stable::Tensor new_empty_checked(const torch::stable::Tensor& like,
                                               torch::headeronly::IntHeaderOnlyArrayRef size,
                                               std::optional<torch::headeronly::ScalarType> dtype,
                                               const char* what) {
  const auto type = dtype.value_or(like.scalar_type());
  int64_t bytes = element_size(type);
  bool overflow = false, empty = false;
  for (const int64_t n : size) {
    STD_TORCH_CHECK(n >= 0, "tokenmix: ", what, " would have a negative size ", shape_string(size));
    empty = empty || n == 0;
    overflow = overflow || __builtin_mul_overflow(bytes, n, &bytes);
  }
  if (empty) bytes = 0, overflow = false;
  STD_TORCH_CHECK(!overflow, "tokenmix: out of memory: ", what, " of shape ", shape_string(size),
                  " would need more than 2^63 bytes");
  try {
    return torch::stable::new_empty(like, size, type);
  } catch (const std::exception&) {
    const std::string device = like.is_cuda()  ? "cuda:" + std::to_string(like.get_device())
                               : like.is_cpu() ? std::string("cpu")
                                               : std::string("its device");
    STD_TORCH_CHECK(false, "tokenmix: out of memory: could not allocate ", what, " of shape ",
                    shape_string(size), " (", bytes, " bytes, ",
                    std::to_string(double(bytes) / double(int64_t(1) << 30)), " GiB) on ", device);
  }
  return like;  // not reached
}

// new_empty_checked, filled with zeros.
inline torch::stable::Tensor new_zeros_checked(const torch::stable::Tensor& like,
                                               torch::headeronly::IntHeaderOnlyArrayRef size,
                                               std::optional<torch::headeronly::ScalarType> dtype,
                                               const char* what) {
  torch::stable::Tensor t = new_empty_checked(like, size, dtype, what);
  if (t.numel() > 0) torch::stable::zero_(t);
  return t;
}

// ParallelForFn over torch's intra-op thread pool.
inline void host_parallel_for(int64_t begin, int64_t end, int64_t grain,
                              void (*fn)(int64_t, int64_t, void*), void* ctx) {
  torch::stable::parallel_for(begin, end, grain, [&](int64_t lo, int64_t hi) { fn(lo, hi, ctx); });
}

}  // namespace tokenmix
