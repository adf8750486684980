// Moving channel blocks between tensors and the FFT engine's vectors: one lane per channel,
// lanes past the last channel read as 0 and are never written.
#pragma once

#include <cstdint>

#include "tokenmix/cpu/simd.h"
#include "tokenmix/tensor_view.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

// One element of a tensor whose dtype is known only at run time (filters, biases).
template <class T>
inline T load_dynamic(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat32: return T(static_cast<const float*>(base)[offset]);
    case DType::kFloat64: return T(static_cast<const double*>(base)[offset]);
    case DType::kFloat16: return T(to_float(static_cast<const Half*>(base)[offset]));
    case DType::kBFloat16: return T(to_float(static_cast<const BFloat16*>(base)[offset]));
  }
  return T(0);
}

template <class T>
inline void store_dynamic(void* base, DType dtype, int64_t offset, T value) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[offset] = float(value); return;
    case DType::kFloat64: static_cast<double*>(base)[offset] = double(value); return;
    case DType::kFloat16: static_cast<Half*>(base)[offset] = from_float<Half>(value); return;
    case DType::kBFloat16:
      static_cast<BFloat16*>(base)[offset] = from_float<BFloat16>(value);
      return;
  }
}

// lanes values at p[0], p[stride], ... as a vector of T.
template <class S, class T>
inline typename Simd<T>::V load_lanes(const S* p, int64_t stride, int lanes) {
  using V = typename Simd<T>::V;
  if constexpr (std::is_same_v<S, T>) {
    if (stride == 1 && lanes == Simd<T>::kWidth) return vload<V>(p);
  }
  V v{};
  for (int l = 0; l < lanes; ++l) v[l] = T(to_float(p[l * stride]));
  return v;
}

// The first lanes values of v to the contiguous p[0..lanes).
template <class S, class T>
inline void store_lanes(S* p, typename Simd<T>::V v, int lanes) {
  if constexpr (std::is_same_v<S, T>) {
    if (lanes == Simd<T>::kWidth) return vstore(p, v);
  }
  for (int l = 0; l < lanes; ++l) p[l] = from_float<S>(v[l]);
}

// A [.., tokens, channels] operand seen from one channel block: element (token t, lane l) is
// data[base + t * token_stride + l * channel_stride].
template <class S>
struct ChannelBlock {
  const S* data = nullptr;
  int64_t token_stride = 0, channel_stride = 0;

  ChannelBlock() = default;
  ChannelBlock(const void* base, int64_t offset, int64_t token_stride_, int64_t channel_stride_)
      : data(base ? static_cast<const S*>(base) + offset : nullptr),
        token_stride(token_stride_),
        channel_stride(channel_stride_) {}
  explicit operator bool() const { return data != nullptr; }
  template <class T>
  typename Simd<T>::V load(int64_t t, int lanes) const {
    return load_lanes<S, T>(data + t * token_stride, channel_stride, lanes);
  }
};

}  // namespace tokenmix::cpu::TOKENMIX_ISA
