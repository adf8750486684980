// Helpers shared by the op layers (torch stable ABI only).
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

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

// a * b for non-negative a and b, raising (with `what` in the message) instead of wrapping.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  STD_TORCH_CHECK(!__builtin_mul_overflow(a, b, &r), "tokenmix: ", what, " overflows int64");
  return r;
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

// Shape of a tensor as a vector (for new_empty_checked).
inline std::vector<int64_t> sizes_of(const torch::stable::Tensor& t) {
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().end());
}

// Whether two tensors live on the same device.
inline bool same_device(const torch::stable::Tensor& a, const torch::stable::Tensor& b) {
  return a.is_cpu() == b.is_cpu() && a.is_cuda() == b.is_cuda() && a.get_device() == b.get_device();
}

// The CUDA kernels copy rows with 16-byte cp.async: each row must start 16-byte aligned. Tensors
// that are not (odd storage offsets, strides that are not multiples of 16 bytes) are cloned.
inline bool rows_aligned(const torch::stable::Tensor& t) {
  const int64_t elem = t.scalar_type() == torch::headeronly::ScalarType::Float ? 4 : 2;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) > 1 && (t.stride(i) * elem) % 16 != 0) return false;
  return t.dim() == 0 || t.stride(t.dim() - 1) == 1 || t.size(t.dim() - 1) <= 1;
}

inline torch::stable::Tensor aligned_rows(const torch::stable::Tensor& t) {
  if (rows_aligned(t)) return t;
  torch::stable::Tensor c =
      new_empty_checked(t, sizes_of(t), std::nullopt, "a 16-byte aligned copy of an input");
  torch::stable::copy_(c, t);
  STD_TORCH_CHECK(rows_aligned(c), "tokenmix: could not make a 16-byte aligned copy of an input");
  return c;
}

inline std::optional<torch::stable::Tensor> aligned_rows(
    const std::optional<torch::stable::Tensor>& t) {
  if (!t.has_value()) return t;
  return aligned_rows(*t);
}

}  // namespace tokenmix
