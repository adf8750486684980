// Types and qualifiers shared by the device mapping (nvcc) and the CPU emulator of the SIMT layer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tokenmix/host_device.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// A kernel entry point: `TM_GLOBAL void my_kernel(global_ptr<float> out, int n) { ... }`.
#define TM_GLOBAL __global__
// A function called from kernel code.
#define TM_DEVICE __device__ __forceinline__
// Fully unrolls the loop that follows: loops over register fragments must unroll, or the
// fragments are indexed at run time and move to local memory.
#define TM_UNROLL _Pragma("unroll")
#else
#define TM_GLOBAL __attribute__((noinline))
#define TM_DEVICE inline
#define TM_UNROLL
#endif

namespace tokenmix::simt {

// threadIdx / blockIdx / blockDim / gridDim as plain unsigned triples.
struct dim3u {
  uint32_t x, y, z;
  TM_HOST_DEVICE constexpr dim3u(uint32_t x_ = 1, uint32_t y_ = 1, uint32_t z_ = 1)
      : x(x_), y(y_), z(z_) {}
  TM_HOST_DEVICE constexpr uint32_t volume() const { return x * y * z; }
};

// The 16-byte value moved by load128 / store128 (layout of CUDA's uint4).
struct alignas(16) u32x4 {
  uint32_t x, y, z, w;
};

// Bit casts between float and its 32-bit pattern.
TM_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

TM_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// float32 -> TensorFloat-32 (the operand format of mma .tf32): the 32-bit pattern with the low 13
// mantissa bits cleared after rounding to nearest, ties away from zero (PTX cvt.rna.tf32.f32).
// Infinities pass through, a NaN becomes the canonical NaN (whose payload survives the low
// bits being ignored); a finite value past tf32's largest rounds to infinity.
TM_HOST_DEVICE uint32_t f32_to_tf32_bits(float f) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
  return r;
#else
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffffffu;  // NaN: the canonical one
  if ((x & 0x7f800000u) == 0x7f800000u) return x;           // +-inf
  return (x + 0x1000u) & 0xffffe000u;
#endif
}

// IEEE binary16 and bfloat16 as raw 16-bit patterns, round to nearest even. The host versions are
// exact bit manipulations (the emulator's mma reads its operands through them).
TM_HOST_DEVICE uint16_t f32_to_f16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to infinity
  if (ax < 0x38800000u) {                                  // subnormal half or zero
    const uint32_t e = ax >> 23;
    if (e < 102) return uint16_t(sign);
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = (ax >> 13) - (112u << 10);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) ++r;
  return uint16_t(sign | r);
#endif
}

TM_HOST_DEVICE float f16_bits_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float v = float(m) * (1.0f / 16777216.0f);  // m * 2^-24, exact
    return sign ? -v : v;
  }
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
#endif
}

TM_HOST_DEVICE uint16_t f32_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
#endif
}

TM_HOST_DEVICE float bf16_bits_to_f32(uint16_t h) {
  return bits_float(uint32_t(h) << 16);
}

// A kernel argument that is a buffer of `count` elements: registered with the emulator for the
// launch, a plain pointer under nvcc.
template <class T>
struct buffer_arg {
  T* ptr;
  size_t count;
  const char* name;
};
template <class T>
buffer_arg<T> buffer(T* ptr, size_t count, const char* name = nullptr) {
  return {ptr, count, name};
}

// A kernel with the name emulator reports give it (otherwise its symbol name, when the dynamic
// linker can see it); nvcc launches `fn`.
template <class... P>
struct named_kernel {
  void (*fn)(P...);
  const char* name;
};
template <class... P>
named_kernel<P...> named(void (*fn)(P...), const char* name) {
  return {fn, name};
}

namespace detail {
// A 4-byte value as its 32-bit pattern and back: what shuffles move.
template <class T>
TM_HOST_DEVICE uint32_t to_u32(T v) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable<T>::value,
                "shuffles move 32-bit values");
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <class T>
TM_HOST_DEVICE T from_u32(uint32_t u) {
  T v;
  memcpy(&v, &u, 4);
  return v;
}
}  // namespace detail

// Two 16-bit values in one 32-bit register, `lo` in bits 0-15 (the first element of a pair).
TM_HOST_DEVICE uint32_t pack_b16x2(uint16_t lo, uint16_t hi) {
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

}  // namespace tokenmix::simt
