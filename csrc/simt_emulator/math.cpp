// SIMT emulator: the approximate math instructions, exact or with the PTX ISA's maximum error.
//
// What nvcc emits for the SIMT layer's functions (checked in tests/test_simt_emulator.py) and the
// error the PTX ISA documents for it (PTX ISA 9.1, sections 9.7.3.16 rsqrt, 9.7.3.20 lg2,
// 9.7.3.21 ex2):
//   exp2f_approx  ex2.approx.f32    at most 2 ulp from the correctly rounded result
//   exp2f_ftz     ex2.approx.ftz.f32  the same, with subnormal inputs read as 0 and subnormal
//                                   results flushed to +0
//   expf_approx   mul.f32 by log2(e) (0x3fb8aa3b), then ex2.approx.f32
//   log2f_approx  lg2.approx.f32    absolute error at most 2^-22 for x in (0.5, 2), relative error
//                                   at most 2^-22 for other positive finite x
//   rsqrt         rsqrt.approx.f32  relative error at most 2^-22.9 over the positive finite range
// In the approx numeric mode each result is moved off the exact one by a deterministic amount of
// up to that error: a hash of the launch's seed, the function and the input's bits, so a kernel is
// reproducible and equal inputs give equal outputs, as on a GPU. Special inputs (0, infinities,
// NaN, negatives) give the exact special results the PTX ISA lists.
#include <cfloat>
#include <cmath>

#include "internal.h"

namespace tokenmix::simt::emu {
namespace {

uint64_t mix(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A deterministic value in [-1, 1] for this seed, function and input.
double unit(uint64_t seed, math_fn f, float x) {
  const uint64_t h = mix(mix(seed + 0x9e3779b97f4a7c15ull) ^ (uint64_t(f) << 32 | float_bits(x)));
  return double(h >> 11) * 0x1p-52 - 1.0;  // 53 random bits over [0, 2): [-1, 1)
}

// `exact` rounded to float and moved by u * max_abs (|u| <= 1), never further than max_abs from
// `exact` (a step back after the rounding, when it overshoots).
float off_by(double exact, double u, double max_abs) {
  float r = float(exact + u * max_abs);
  if (std::fabs(double(r) - exact) > max_abs) r = std::nextafter(r, float(exact));
  return r;
}

float ex2(uint64_t seed, float x) {
  const float r = float(std::exp2(double(x)));  // correctly rounded (up to double rounding)
  // +-0 give exactly 1 (the PTX ISA's table); under/overflow and NaN stay exact
  if (x == 0.0f || r == 0.0f || !std::isfinite(r)) return r;
  // up to 2 ulp: |k| steps to the neighbouring floats, k in {-2, ..., 2}, staying finite and >= 0
  const int k = int(std::floor((unit(seed, math_fn::ex2, x) + 1.0) * 2.5)) - 2;
  float y = r;
  for (int i = 0; i < std::abs(k); ++i) y = std::nextafter(y, k > 0 ? FLT_MAX : 0.0f);
  return y;
}

// .ftz: a subnormal input is a zero of its sign, a subnormal result +0.
float flush(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
}

float lg2(uint64_t seed, float x) {
  const double exact = std::log2(double(x));
  if (!(x > 0.0f) || !std::isfinite(x)) return float(exact);  // -inf, NaN, +inf
  const double u = unit(seed, math_fn::lg2, x);
  return off_by(exact, u, x > 0.5f && x < 2.0f ? 0x1p-22 : std::fabs(exact) * 0x1p-22);
}

float rsqrt_approx(uint64_t seed, float x) {
  if (!(x > 0.0f) || !std::isfinite(x)) return 1.0f / std::sqrt(x);  // +-0, +inf, negatives, NaN
  const double exact = 1.0 / std::sqrt(double(x));
  return off_by(exact, unit(seed, math_fn::rsqrt, x), exact * std::exp2(-22.9));
}

}  // namespace

float approx_math(math_fn f, float x) {
  const launch_state* L = current_launch();
  if (!L || L->math != math_mode::approx) {
    switch (f) {
      case math_fn::ex2: return std::exp2(x);
      case math_fn::ex2_ftz: return flush(std::exp2(flush(x)));
      case math_fn::exp: return std::exp(x);
      case math_fn::lg2: return std::log2(x);
      case math_fn::rsqrt: return 1.0f / std::sqrt(x);
    }
  }
  const uint64_t seed = L->math_seed;
  switch (f) {
    case math_fn::ex2: return ex2(seed, x);
    case math_fn::ex2_ftz: return flush(ex2(seed, flush(x)));
    case math_fn::exp: return ex2(seed, x * 0x1.715476p+0f);  // __expf: x * log2(e), as nvcc emits
    case math_fn::lg2: return lg2(seed, x);
    case math_fn::rsqrt: return rsqrt_approx(seed, x);
  }
  return x;
}

}  // namespace tokenmix::simt::emu
