// Portable SIMD for the CPU kernels, built on GCC/Clang vector extensions.
// Each kernel translation unit is compiled once per instruction set with
// TOKENMIX_VEC_BYTES set to 16 (SSE2 baseline), 32 (AVX2) or 64 (AVX-512), so
// the same source becomes three register-blocked kernels; the runtime picks
// one (csrc/runtime.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "tokenmix/cpu/isa_config.h"
#ifndef TOKENMIX_ISA
#error "TOKENMIX_ISA must be defined by the build"
#endif

#include <cstdlib>
#include <new>

#include "tokenmix/cpu/large_block_cache.h"

#if TOKENMIX_VEC_BYTES >= 64
#include <immintrin.h>
#endif

// Everything compiled with ISA-specific flags lives in its own namespace and
// uses no out-of-line standard-library templates (std::vector, std::fill...):
// the linker merges identical template instantiations across translation
// units, and an AVX-512 copy must never be picked for the baseline kernels.
namespace tokenmix::cpu::TOKENMIX_ISA {

template <class T>
inline T min_of(T a, T b) {
  return a < b ? a : b;
}
template <class T>
inline T max_of(T a, T b) {
  return a > b ? a : b;
}

template <class T>
inline void fill(T* begin, T* end, T value) {
  for (; begin != end; ++begin) *begin = value;
}

// Owning, 64-byte aligned, uninitialized array of trivially copyable T.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }
  void assign(size_t n, T value) {
    allocate(n);
    fill(data_, data_ + n, value);
  }
  // Size n, contents unspecified (for buffers the caller fills in parallel). `large`: a
  // per-call buffer of megabytes (a K/V copy) comes from, and returns to, the large-block
  // cache (large_block_cache.h): 2 MiB aligned, offered to transparent huge pages, and its
  // pages already touched when a previous call left it there. Fresh 4 KiB pages cost a fault
  // each on first touch, about 4,000 for a 16 MiB copy, which measured several milliseconds of
  // system time per call in a VM.
  void allocate(size_t n, bool large = false) {
    if (n > capacity_) {
      release();
      const size_t bytes = n * sizeof(T);
      if (large && bytes >= kLargeBlockAlign) {
        size_t got = 0;
        data_ = static_cast<T*>(take_large_block(bytes, &got));
        block_bytes_ = got;
        capacity_ = got / sizeof(T);
      } else {
        data_ = static_cast<T*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
        if (!data_) throw std::bad_alloc();
        capacity_ = n;
      }
    }
    size_ = n;
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T* begin() { return data_; }
  T* end() { return data_ + size_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }
  size_t size() const { return size_; }

 private:
  void release() {
    if (block_bytes_)
      give_large_block(data_, block_bytes_);
    else
      std::free(data_);
    data_ = nullptr;
    size_ = capacity_ = block_bytes_ = 0;
  }
  T* data_ = nullptr;
  size_t size_ = 0, capacity_ = 0;
  size_t block_bytes_ = 0;  // nonzero: a block of the large-block cache
};

typedef float vfloat __attribute__((vector_size(TOKENMIX_VEC_BYTES)));
typedef double vdouble __attribute__((vector_size(TOKENMIX_VEC_BYTES)));
typedef int32_t vint32 __attribute__((vector_size(TOKENMIX_VEC_BYTES)));
typedef int64_t vint64 __attribute__((vector_size(TOKENMIX_VEC_BYTES)));

template <class T>
struct Simd;

template <>
struct Simd<float> {
  using V = vfloat;
  using VI = vint32;
  using I = int32_t;
  static constexpr int kWidth = TOKENMIX_VEC_BYTES / 4;
};

template <>
struct Simd<double> {
  using V = vdouble;
  using VI = vint64;
  using I = int64_t;
  static constexpr int kWidth = TOKENMIX_VEC_BYTES / 8;
};

template <class V>
inline V vload(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V>
inline void vstore(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// x - 0 is x for every x (0 + x would turn -0 into +0), so the compiler folds
// the subtraction away: a plain broadcast, or a broadcast memory operand of
// the instruction that uses it.
template <class V, class T>
inline V vbroadcast(T x) {
  return x - V{};
}

template <class T>
inline T hmax(typename Simd<T>::V v) {
  T m = v[0];
  for (int i = 1; i < Simd<T>::kWidth; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

template <class T>
inline T hsum(typename Simd<T>::V v) {
  T s = 0;
  for (int i = 0; i < Simd<T>::kWidth; ++i) s += v[i];
  return s;
}

// 2^f for |f| <= 0.5: the degree-7 Taylor polynomial of e^(f ln 2), relative error
// below 2e-7. Both exp2 variants scale it by 2^round(x).
inline vfloat exp2_fraction(vfloat f) {
  const float c1 = 0.6931471805599453f, c2 = 0.2402265069591007f, c3 = 0.05550410866482158f,
              c4 = 0.009618129107628477f, c5 = 0.0013333558146428443f, c6 = 0.00015403530393381606f,
              c7 = 1.525273380405984e-05f;
  vfloat p = vbroadcast<vfloat>(c7);
  p = p * f + c6;
  p = p * f + c5;
  p = p * f + c4;
  p = p * f + c3;
  p = p * f + c2;
  p = p * f + c1;
  return p * f + 1.0f;
}

// 2^x for float vectors. Inputs below -126 (including -inf) give exactly 0.
// Range reduction x = n + f, |f| <= 0.5, then a degree-7 Taylor polynomial of
// e^(f ln 2): relative error below 2e-7 on the whole range.
inline vfloat vexp2(vfloat x) {
  // 2^x for x in [-126, 128) from 2^round(x) * p(x - round(x)); below that 0
  // (subnormals flush), from 128 on inf, NaN stays NaN. 2^128 is not a float, so
  // round(x) == 128 is applied as 2 * 2^127: p(f) * 2 * 2^127 overflows to inf
  // exactly when the true value does.
  const vfloat lo = vbroadcast<vfloat>(-126.0f);
  const vfloat hi = vbroadcast<vfloat>(128.0f);
  vfloat xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vfloat half = vbroadcast<vfloat>(0.5f);
  // round to nearest: floor(x + 0.5)
  vfloat t = xc + half;
  vint32 ti = __builtin_convertvector(t, vint32);  // truncates toward zero
  vfloat tf = __builtin_convertvector(ti, vfloat);
  ti = tf > t ? ti - 1 : ti;
  tf = __builtin_convertvector(ti, vfloat);
  const vfloat f = xc - tf;
  vfloat p = exp2_fraction(f);
  const vint32 top = vbroadcast<vint32>(127);
  const vint32 over = ti > top;  // all ones where round(x) == 128
  p = over ? p * 2.0f : p;
  ti = over ? top : ti;
  const vint32 bits = (ti + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  vfloat r = p * scale;
  const vfloat zero = vfloat{};
  return x < lo ? zero : r;
}

// 2^x for x <= 0 (or -inf, or NaN), as the online softmax takes it: the same
// polynomial as vexp2 with a cheaper reduction. round(x) comes from adding
// 1.5 * 2^23 (the sum's low mantissa bits hold it), and nothing can overflow.
// Below -126 (and -inf) exactly 0; NaN stays NaN.
#if TOKENMIX_VEC_BYTES >= 64
// AVX-512: round(x) by vrndscaleps and the scaling by vscalefps, with zero-masking for x < -126
// (and -inf): the same n, f and p as above, and p * 2^n is the same single rounding, so the
// result is bit for bit the portable one's, without assembling the exponent in integer lanes.
inline vfloat vexp2_nonpositive(vfloat x) {
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);  // NaN kept
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vfloat p = exp2_fraction(x - vfloat(n));
  return vfloat(_mm512_maskz_scalef_ps(kept, __m512(p), n));
}
#else
inline vfloat vexp2_nonpositive(vfloat x) {
  const vfloat lo = vbroadcast<vfloat>(-126.0f);
  const vfloat magic = vbroadcast<vfloat>(12582912.0f);  // 1.5 * 2^23
  const vfloat xc = x < lo ? lo : x;
  const vfloat t = xc + magic;
  const vfloat f = xc - (t - magic);
  vfloat p = exp2_fraction(f);
  vint32 ti, mi;
  std::memcpy(&ti, &t, sizeof(ti));
  std::memcpy(&mi, &magic, sizeof(mi));
  const vint32 bits = (ti - mi + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? vfloat{} : p * scale;
}
#endif

#if TOKENMIX_VEC_BYTES >= 64
// dst_t[d * ld + i] = rows[i][d] * mult for 16 rows i and d < dim; a null row reads as zeros.
// Blocks of 16 x 16 are loaded as rows and transposed in registers: writing the transposed copy
// one element at a time cost the block-sparse forward about 3% of its time (a 64 x 64 query tile
// is 4096 scalar stores).
inline void transpose_rows16(const float* const rows[16], int dim, float mult, float* dst_t,
                             int64_t ld) {
  const __m512 m = _mm512_set1_ps(mult);
  for (int d0 = 0; d0 < dim; d0 += 16) {
    const int nd = dim - d0 < 16 ? dim - d0 : 16;
    const __mmask16 km = __mmask16(nd == 16 ? 0xFFFFu : (1u << nd) - 1u);
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i)
      r[i] =
          rows[i] ? _mm512_mul_ps(_mm512_maskz_loadu_ps(km, rows[i] + d0), m) : _mm512_setzero_ps();
    // Pairs of rows interleaved: in 128-bit lane j, t[2i] = (r2i[4j], r2i+1[4j], r2i[4j+1],
    // r2i+1[4j+1]) and t[2i + 1] the same for columns 4j + 2 and 4j + 3.
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Quads: in 128-bit lane j, r[4i + k] = column 4j + k of rows 4i .. 4i + 3.
    for (int i = 0; i < 4; ++i) {
      const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
      const __m512d c = _mm512_castps_pd(t[4 * i + 1]), e = _mm512_castps_pd(t[4 * i + 3]);
      r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
      r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, e));
      r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, e));
    }
    // 128-bit lanes transposed 4 x 4: column 4j + k gathers lane j of r[k], r[4 + k], r[8 + k],
    // r[12 + k].
    for (int k = 0; k < 4; ++k) {
      const __m512 v0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x44);
      const __m512 v1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xEE);
      const __m512 v2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x44);
      const __m512 v3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xEE);
      t[k] = _mm512_shuffle_f32x4(v0, v2, 0x88);
      t[4 + k] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
      t[8 + k] = _mm512_shuffle_f32x4(v1, v3, 0x88);
      t[12 + k] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
    for (int c = 0; c < nd; ++c) _mm512_storeu_ps(dst_t + int64_t(d0 + c) * ld, t[c]);
  }
}
#endif

inline vdouble vexp2(vdouble x) {
  vdouble r;
  for (int i = 0; i < Simd<double>::kWidth; ++i) r[i] = std::exp2(x[i]);
  return r;
}

inline vdouble vexp2_nonpositive(vdouble x) {
  return vexp2(x);
}

// ---- storage types -------------------------------------------------------

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float to_float(float x) {
  return x;
}
inline double to_float(double x) {
  return x;
}
inline float to_float(BFloat16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(Half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1f;
  uint32_t mant = h.bits & 0x3ff;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal half: normalize
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400) == 0);
    u = sign | uint32_t(112 - e) << 23 | ((mant & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class S>
inline S from_float(double x);
template <>
inline float from_float<float>(double x) {
  return float(x);
}
template <>
inline double from_float<double>(double x) {
  return x;
}
template <>
inline BFloat16 from_float<BFloat16>(double xd) {
  const float x = float(xd);
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x40)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return BFloat16{uint16_t(u >> 16)};
}
template <>
inline Half from_float<Half>(double xd) {
  const float x = float(xd);
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return Half{uint16_t(sign | 0x7e00)};   // NaN
  if (a >= 0x477ff000u) return Half{uint16_t(sign | 0x7c00)};  // overflow -> inf
  if (a < 0x38800000u) {                                       // subnormal or zero in half
    if (a < 0x33000000u) return Half{sign};
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const int shift = int(126 - e);  // 14 .. 24
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1))) ++h;
    return Half{uint16_t(sign | h)};
  }
  uint32_t h = ((a >> 13) - (112u << 10));
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return Half{uint16_t(sign | h)};
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
