// Moving channel blocks between tensors and the FFT engine's vectors: one lane per channel,
// lanes past the last channel read as 0 and are never written.
#pragma once

#include <cstdint>
#include <type_traits>

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

// dst[t] (t < tokens) = lanes channels of a [channels, tokens] operand of storage type S:
// element (t, l) at src[l * channel_stride + t * token_stride]. Rows of unit token stride are
// read in tiles, so each row streams and the tile of vectors stays in L1.
template <class S, class T>
void load_channel_rows(const S* src, int64_t channel_stride, int64_t token_stride, int lanes,
                       int64_t tokens, typename Simd<T>::V* dst) {
  using V = typename Simd<T>::V;
  if (channel_stride == 1) {
    for (int64_t t = 0; t < tokens; ++t)
      dst[t] = load_lanes<S, T>(src + t * token_stride, 1, lanes);
    return;
  }
  constexpr int64_t kTile = 64;
  for (int64_t t0 = 0; t0 < tokens; t0 += kTile) {
    const int64_t t1 = t0 + kTile < tokens ? t0 + kTile : tokens;
    for (int64_t t = t0; t < t1; ++t) dst[t] = V{};
    for (int l = 0; l < lanes; ++l) {
      const S* row = src + l * channel_stride;
      for (int64_t t = t0; t < t1; ++t) dst[t][l] = T(to_float(row[t * token_stride]));
    }
  }
}

// The same for a tensor whose dtype is known only at run time.
template <class T>
void load_channel_rows(const void* src, DType dtype, int64_t channel_stride, int64_t token_stride,
                       int lanes, int64_t tokens, typename Simd<T>::V* dst) {
  switch (dtype) {
    case DType::kFloat32:
      return load_channel_rows<float, T>(static_cast<const float*>(src), channel_stride,
                                         token_stride, lanes, tokens, dst);
    case DType::kFloat64:
      return load_channel_rows<double, T>(static_cast<const double*>(src), channel_stride,
                                          token_stride, lanes, tokens, dst);
    case DType::kFloat16:
      return load_channel_rows<Half, T>(static_cast<const Half*>(src), channel_stride, token_stride,
                                        lanes, tokens, dst);
    case DType::kBFloat16:
      return load_channel_rows<BFloat16, T>(static_cast<const BFloat16*>(src), channel_stride,
                                            token_stride, lanes, tokens, dst);
  }
}

// Tokens ahead that the row loops prefetch. A channel block reads one short row per token,
// at a stride of the whole channel count: every row is in another page, which the hardware
// prefetchers do not follow.
inline constexpr int64_t kPrefetchTokens = 12;

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
    __builtin_prefetch(data + (t + kPrefetchTokens) * token_stride);
    return load_lanes<S, T>(data + t * token_stride, channel_stride, lanes);
  }
};

// A contiguous [tokens, channels] output seen from one channel block (lane l of token t at
// data[t * channels + l]).
template <class S>
struct OutputRows {
  S* data = nullptr;
  int64_t channels = 0;

  template <class T>
  void store(int64_t t, typename Simd<T>::V v, int lanes) const {
    __builtin_prefetch(data + (t + kPrefetchTokens) * channels, 1);
    store_lanes<S, T>(data + t * channels, v, lanes);
  }
};

}  // namespace tokenmix::cpu::TOKENMIX_ISA
