// simt_selftest: runs the SIMT self-test kernels on the emulator.
//
//   simt_selftest list                 names of all subcommands
//   simt_selftest <name> [--workers N] one test: prints "PASS <name> ..." (or for a planted bug
//                                      "REPORTED <name> [<kind>]" and the report), exit 0 when the
//                                      outcome is the expected one
//   simt_selftest all                  every test in one process
//   simt_selftest layouts              fragment tables: mma from the emulator's tables, ldmatrix
//                                      probed by running the emulated instruction
#include <cfloat>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "selftest_kernels.h"
#include "selftest_wgmma.h"
#include "tokenmix/simt/simt.h"

namespace {

using namespace tokenmix::simt;
namespace st = tokenmix::simt_selftest;

[[noreturn]] void failf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void failf(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  throw std::runtime_error(buf);
}

template <class T>
void expect_eq(const char* what, size_t i, T got, T want) {
  if (!(got == want))
    failf("%s[%zu]: got %lld, expected %lld", what, i, static_cast<long long>(got),
          static_cast<long long>(want));
}

// ---- positive tests ----------------------------------------------------------------------------

std::string test_shuffles() {
  std::vector<int> oi(st::kShuffleResults * st::kShuffleThreads, 0);
  std::vector<float> of(st::kShuffleThreads, 0.0f);
  std::vector<unsigned> ou(st::kShuffleThreads, 0);
  st::launch_shuffles(oi.data(), of.data(), ou.data());
  for (int t = 0; t < st::kShuffleThreads; ++t) {
    const int lane = t % 32, w = t / 32, base = 1000 * w + lane;
    const int want[st::kShuffleResults] = {1000 * w + ((lane * 7 + 3) & 31),
                                           lane >= 3 ? base - 3 : base,
                                           lane + 5 < 32 ? base + 5 : base,
                                           1000 * w + (lane ^ 9),
                                           1000 * w + (lane ^ 4),
                                           1000 * w + ((lane + 40) & 31),
                                           base,
                                           lane >= 8 && lane < 16 ? 1000 * w + 8 : -1};
    for (int k = 0; k < st::kShuffleResults; ++k)
      expect_eq("shuffle result", size_t(k * st::kShuffleThreads + t),
                oi[k * st::kShuffleThreads + t], want[k]);
    if (of[t] != float(1000 * w + (lane ^ 1)) * 0.5f) failf("float shfl_xor at %d: %g", t, of[t]);
    expect_eq("unsigned shfl_down", size_t(t), ou[t],
              0x80000000u + unsigned(lane + 16 < 32 ? base + 16 : base));
  }
  return "shfl idx/up/down/xor, disjoint partial masks, int/float/unsigned";
}

std::string test_votes() {
  std::vector<uint32_t> out(st::kVoteResults * st::kVoteThreads, 7);
  st::launch_votes(out.data());
  uint32_t every_third = 0;
  for (int l = 0; l < 32; l += 3) every_third |= 1u << l;
  for (int t = 0; t < st::kVoteThreads; ++t) {
    const int lane = t % 32, w = t / 32;
    const uint32_t want[st::kVoteResults] = {
        every_third, uint32_t(w == 1), 1, 0, lane < 8 ? 0xaau : 0xffffff00u, 0};
    for (int k = 0; k < st::kVoteResults; ++k)
      expect_eq("vote result", size_t(k * st::kVoteThreads + t), out[k * st::kVoteThreads + t],
                want[k]);
  }
  return "ballot/any/all with full and partial member masks";
}

std::string test_warp_sync() {
  std::vector<uint32_t> out(64, 0);
  st::launch_warp_exchange(out.data(), true);
  for (uint32_t t = 0; t < 64; ++t) expect_eq("exchange", t, out[t], (t ^ 1u) * 3u);
  return "lanes exchange through shared memory ordered by sync_warp";
}

std::string test_indices() {
  std::vector<uint32_t> out(st::kIndexWords, 0xdeadbeefu);
  st::launch_indices(out.data());
  for (uint32_t bz = 0; bz < 2; ++bz)
    for (uint32_t by = 0; by < 3; ++by)
      for (uint32_t bx = 0; bx < 2; ++bx)
        for (uint32_t tz = 0; tz < 2; ++tz)
          for (uint32_t ty = 0; ty < 4; ++ty)
            for (uint32_t tx = 0; tx < 8; ++tx) {
              const uint32_t linear = tx + 8 * (ty + 4 * tz);
              const size_t slot = 4 * ((bx + 2 * (by + 3 * bz)) * 64 + linear);
              expect_eq("thread_idx", slot, out[slot], tx | ty << 8 | tz << 16);
              expect_eq("block_idx", slot, out[slot + 1], bx | by << 8 | bz << 16);
              expect_eq("lane | warp", slot, out[slot + 2], (linear & 31) | (linear >> 5) << 8);
              expect_eq("linear index", slot, out[slot + 3], linear);
            }
  return "3-D grid (2,3,2) x block (8,4,2): thread/block indices, lanes, warps";
}

std::string test_registered() {
  const int n = 40;
  std::vector<float> in(n + 1), out(n + 1, NAN);
  for (int i = 0; i <= n; ++i) in[i] = float(i);
  st::launch_registered(in.data(), out.data(), n);
  for (int i = 0; i <= n; ++i)
    if (out[i] != 2.0f * float(i)) failf("out[%d] = %g", i, double(out[i]));
  return "raw global_ptr arguments inside buffers registered with global_registration";
}

std::string test_math() {
  const int n = 100;
  std::vector<float> in(n), out(6 * n, NAN);
  for (int i = 0; i < n; ++i) in[i] = 0.05f + 0.37f * float(i);
  st::launch_math(in.data(), out.data(), n);
  for (int i = 0; i < n; ++i) {
    const double x = in[i];
    const double want[6] = {std::exp2(x), std::exp(x),      std::log2(x),
                            1 / x,        1 / std::sqrt(x), std::exp2(x)};
    for (int k = 0; k < 6; ++k)
      if (!(std::fabs(out[6 * i + k] - want[k]) <= 2e-6 * std::fabs(want[k]) + 1e-30))
        failf("math function %d at x=%g: %.9g, expected %.9g", k, x, double(out[6 * i + k]),
              want[k]);
  }
  return "exp2f_approx, expf_approx, log2f_approx, rcp, rsqrt, exp2f_ftz (host: the std "
         "functions)";
}

// Sets an environment variable for the scope (the emulator reads its settings at each launch).
class scoped_env {
 public:
  scoped_env(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    set(value);
  }
  ~scoped_env() { set(had_ ? old_.c_str() : nullptr); }
  void set(const char* value) {
    if (value)
      setenv(name_, value, 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

// Distance in floats between two finite floats of the same sign.
long long ulps_apart(float a, float b) {
  return std::llabs(static_cast<long long>(float_bits(a)) - static_cast<long long>(float_bits(b)));
}

bool same(float a, float b) {
  return float_bits(a) == float_bits(b) || (std::isnan(a) && std::isnan(b));
}

// The numeric mode that carries the PTX ISA's maximum errors ($TOKENMIX_SIMT_MATH=approx): every
// result within the documented error of the exact one, results actually moved, special inputs
// exact, the same seed reproducible and another seed different.
std::string test_math_approx() {
  const int n = 4000;
  std::vector<float> in(n);
  std::mt19937 rng(29);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  const float specials[] = {0.0f,      -0.0f, INFINITY,
                            -INFINITY, NAN,   1.0f,
                            2.0f,      0.5f,  std::numeric_limits<float>::denorm_min(),
                            FLT_MAX,   -1.0f, 1e-40f};
  for (int i = 0; i < n; ++i) {
    switch (i % 4) {
      case 0: in[i] = 0.5f + 1.5f * unit(rng); break;  // lg2's absolute-error interval
      case 1: in[i] = std::ldexp(0.5f + unit(rng), int(rng() % 150) - 140); break;
      case 2: in[i] = -150.0f + 280.0f * unit(rng); break;  // ex2: subnormal to overflowing
      default: in[i] = i / 4 < 12 ? specials[i / 4] : 1e6f * unit(rng); break;
    }
  }
  auto run = [&](const char* mode, const char* seed) {
    const scoped_env m("TOKENMIX_SIMT_MATH", mode), sd("TOKENMIX_SIMT_MATH_SEED", seed);
    std::vector<float> out(6 * size_t(n), NAN);
    st::launch_math(in.data(), out.data(), n);
    return out;
  };
  const std::vector<float> approx = run("approx", "1"), again = run("approx", "1"),
                           other = run("approx", "2"), exact = run("exact", nullptr);
  int moved[4] = {0, 0, 0, 0}, normal[4] = {0, 0, 0, 0}, reseeded = 0;
  double widest[4] = {0, 0, 0, 0};  // largest error seen, as a fraction of the bound
  for (int i = 0; i < n; ++i) {
    const float x = in[i];
    const float* got = &approx[6 * size_t(i)];
    for (int k = 0; k < 6; ++k) {
      if (!same(got[k], again[6 * size_t(i) + k]))
        failf("function %d at x=%g: not reproducible", k, x);
      reseeded += !same(got[k], other[6 * size_t(i) + k]);
    }
    // ex2.ftz: ex2 of the flushed input, its subnormal results flushed to +0.
    {
      const float xf = std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
      const float cr = float(std::exp2(double(xf)));
      if (std::fpclassify(cr) == FP_SUBNORMAL || cr == 0.0f) {
        if (!same(got[5], 0.0f)) failf("ex2.ftz at x=%g: %g, expected +0", x, got[5]);
      } else if (xf == 0.0f || !std::isfinite(cr)) {
        if (!same(got[5], cr)) failf("ex2.ftz special at x=%g: %g, expected %g", x, got[5], cr);
      } else if (ulps_apart(got[5], cr) > 2) {
        failf("ex2.ftz at x=%g: %lld ulp from %.9g", x, ulps_apart(got[5], cr), double(cr));
      }
      const float exact_ftz = exact[6 * size_t(i) + 5];
      const float exact_cr = std::exp2(xf);  // the exact mode's std::exp2 in float
      const float want_ftz = std::fpclassify(exact_cr) == FP_SUBNORMAL ? 0.0f : exact_cr;
      if (!same(exact_ftz, want_ftz)) failf("exact mode, ex2.ftz at x=%g: %g", x, exact_ftz);
    }
    // ex2 and __expf (ex2 of the f32 product x * log2(e)): at most 2 ulp from the correctly
    // rounded result; +-0, under- and overflow, infinities and NaN exact.
    const float ex2_in[2] = {x, x * 0x1.715476p+0f};
    for (int k = 0; k < 2; ++k) {
      const float cr = float(std::exp2(double(ex2_in[k])));
      if (ex2_in[k] == 0.0f || cr == 0.0f || !std::isfinite(cr)) {
        if (!same(got[k], cr)) failf("ex2 special at x=%g: %g, expected %g", x, got[k], cr);
        continue;
      }
      const long long d = ulps_apart(got[k], cr);
      if (d > 2) failf("ex2 (function %d) at x=%g: %lld ulp from %.9g", k, x, d, double(cr));
      ++normal[k], moved[k] += d != 0, widest[k] = std::max(widest[k], double(d) / 2);
    }
    // lg2: absolute error 2^-22 in (0.5, 2), relative error 2^-22 elsewhere.
    if (x > 0.0f && std::isfinite(x)) {
      const double want = std::log2(double(x));
      const double bound = x > 0.5f && x < 2.0f ? 0x1p-22 : std::fabs(want) * 0x1p-22;
      const double err = std::fabs(double(got[2]) - want);
      if (err > bound) failf("lg2 at x=%g: error %g > %g", x, err, bound);
      ++normal[2], moved[2] += got[2] != float(want), widest[2] = std::max(widest[2], err / bound);
      // rsqrt: relative error 2^-22.9
      const double r = 1.0 / std::sqrt(double(x)), rbound = r * std::exp2(-22.9);
      const double rerr = std::fabs(double(got[4]) - r);
      if (rerr > rbound) failf("rsqrt at x=%g: error %g > %g", x, rerr, rbound);
      ++normal[3], moved[3] += got[4] != float(r), widest[3] = std::max(widest[3], rerr / rbound);
    } else {
      if (!same(got[2], std::log2(x))) failf("lg2 special at x=%g: %g", x, got[2]);
      if (!same(got[4], 1.0f / std::sqrt(x))) failf("rsqrt special at x=%g: %g", x, got[4]);
    }
    if (!same(got[3], 1.0f / x))
      failf("rcp at x=%g: %g (correctly rounded in every mode)", x, got[3]);
    const float want[5] = {std::exp2(x), std::exp(x), std::log2(x), 1.0f / x, 1.0f / std::sqrt(x)};
    for (int k = 0; k < 5; ++k)  // the default mode is exact
      if (!same(exact[6 * size_t(i) + k], want[k])) failf("exact mode, function %d at x=%g", k, x);
  }
  const char* names[4] = {"ex2", "exp", "lg2", "rsqrt"};
  for (int k = 0; k < 4; ++k) {
    if (moved[k] < normal[k] / 2)
      failf("%s: only %d of %d results differ from the exact ones", names[k], moved[k], normal[k]);
    if (widest[k] < 0.75)
      failf("%s: the largest error is %.2f of the documented maximum", names[k], widest[k]);
  }
  if (reseeded < n) failf("another seed changed only %d results", reseeded);
  char buf[200];
  std::snprintf(buf, sizeof buf,
                "%d inputs: ex2 %d/%d, lg2 %d/%d, rsqrt %d/%d results moved, within the PTX ISA's "
                "maximum errors; specials exact; reproducible per seed",
                n, moved[0], normal[0], moved[2], normal[2], moved[3], normal[3]);
  return buf;
}

// f16 / bf16 bit conversions (the emulator's mma reads operands through them), checked against
// their definitions: decoding by ldexp, round trips, and round-to-nearest-even on random floats.
std::string test_conversions() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const int e = int(h >> 10 & 31), m = int(h & 1023);
    const double sign = (h & 0x8000) ? -1.0 : 1.0;
    const float f = f16_bits_to_f32(uint16_t(h));
    if (e == 31) {
      if (m ? !std::isnan(f) : f != float(sign * INFINITY))
        failf("f16 %04x special decodes to %g", h, f);
      continue;
    }
    const double want = e ? sign * std::ldexp(1024 + m, e - 25) : sign * std::ldexp(m, -24);
    if (double(f) != want || std::signbit(f) != (sign < 0)) failf("f16 %04x decodes to %g", h, f);
    if (f32_to_f16_bits(f) != h) failf("f16 %04x does not round-trip", h);
    const float b = bf16_bits_to_f32(uint16_t(h));
    if (!std::isnan(b) && f32_to_bf16_bits(b) != h) failf("bf16 %04x does not round-trip", h);
  }
  std::mt19937 rng(1);
  for (int trial = 0; trial < 200000; ++trial) {
    const float x = bits_float(rng() & 0x47ffffffu) * (trial & 1 ? 1.0f : -1.0f);  // |x| < 2^16
    const bool bf16 = trial % 4 >= 2;
    if (!bf16 && std::fabs(x) >= 65504.0f) continue;  // overflow: checked below
    const uint16_t r = bf16 ? f32_to_bf16_bits(x) : f32_to_f16_bits(x);
    const auto value = [&](uint16_t v) {
      return bf16 ? double(bf16_bits_to_f32(v)) : double(f16_bits_to_f32(v));
    };
    const double err = std::fabs(value(r) - double(x));
    for (const uint16_t nb : {uint16_t(r - 1), uint16_t(r + 1)}) {
      if ((nb & 0x7fffu) >= (bf16 ? 0x7f80u : 0x7c00u) || ((nb ^ r) & 0x8000u)) continue;
      const double e2 = std::fabs(value(nb) - double(x));
      if (e2 < err || (e2 == err && (r & 1)))
        failf("%s(%.9g) = %04x, but %04x is nearer (or even)", bf16 ? "bf16" : "f16", double(x), r,
              nb);
    }
  }
  if (f32_to_f16_bits(65519.996f) != 0x7bff || f32_to_f16_bits(65520.0f) != 0x7c00 ||
      f32_to_f16_bits(-1e6f) != 0xfc00 || f32_to_f16_bits(1e-8f) != 0 ||
      f32_to_f16_bits(std::ldexp(1.5f, -24)) != 2 || f32_to_bf16_bits(NAN) != 0x7fc0)
    failf("f16/bf16 overflow, underflow or NaN edge case");
  return "all 65536 f16 patterns decode exactly and round-trip; RNE on 200000 random floats";
}

std::string test_reduce() {
  const int n = 10000, blocks = 7, stride = blocks * st::kReduceThreads;
  std::vector<float> in(n), out(blocks, NAN);
  for (int i = 0; i < n; ++i) in[i] = float((i * 37) % 101 - 50);
  st::launch_reduce(in.data(), n, out.data(), blocks);
  for (int b = 0; b < blocks; ++b) {
    double want = 0;
    for (int i = 0; i < n; ++i)
      if ((i % stride) / st::kReduceThreads == b) want += in[i];
    if (double(out[b]) != want) failf("block %d: sum %g, expected %g", b, double(out[b]), want);
  }
  return "7 blocks x 256 threads, shared-memory tree + barriers + shfl_down";
}

std::string test_atomics() {
  float fsum = 0;
  int isum = 0, imax = std::numeric_limits<int>::min();
  unsigned usum = 0;
  std::vector<int> per_block(3 * st::kAtomicBlocks, -1);
  st::launch_atomics(&fsum, &isum, &usum, &imax, per_block.data());
  const int n = st::kAtomicThreads;
  if (fsum != float(st::kAtomicBlocks * n)) failf("float atomic_add: %g", double(fsum));
  expect_eq("int atomic_add", 0, isum, st::kAtomicBlocks * n * (n - 1) / 2);
  expect_eq("unsigned atomic_add", 0, usum, unsigned(2 * st::kAtomicBlocks * n));
  expect_eq("atomic_max", 0, imax, (st::kAtomicBlocks - 1) * 1000 + n - 1);
  for (int b = 0; b < st::kAtomicBlocks; ++b) {
    expect_eq("shared atomic_add", size_t(b), per_block[3 * b], n);
    expect_eq("shared atomic_max", size_t(b), per_block[3 * b + 1], n - 1);
    expect_eq("shared float atomic_add", size_t(b), per_block[3 * b + 2], n / 2);
  }
  return "global and shared atomic_add (float/int/unsigned) and atomic_max";
}

std::string test_atomic_warp() {
  const int warps = st::kAtomicWarpThreads / 32;
  std::vector<int> out(2 * warps, -1);
  st::launch_atomic_warp(out.data());
  for (int w = 0; w < warps; ++w) {
    expect_eq("after the first atomics", size_t(w), out[2 * w], 32 * 33 / 2);
    expect_eq("after the second atomics", size_t(w), out[2 * w + 1], 32 * 33 / 2 + 32);
  }
  return "all lanes atomic_add, sync_warp, one lane reads (twice per warp, 2 warps)";
}

std::string test_vec128() {
  std::vector<uint32_t> in(4 * st::kVecThreads), out(4 * st::kVecThreads, 0);
  std::mt19937 rng(7);
  for (auto& v : in) v = rng();
  st::launch_vec128(in.data(), out.data());
  for (int t = 0; t < st::kVecThreads; ++t)
    for (int k = 0; k < 4; ++k)
      expect_eq("vec128", size_t(4 * t + k), out[4 * t + k], in[4 * (t ^ 1) + k]);
  return "load128/store128 global -> shared -> global";
}

uint16_t to_bits(float f, bool bf16) {
  return bf16 ? f32_to_bf16_bits(f) : f32_to_f16_bits(f);
}
double from_bits(uint16_t h, bool bf16) {
  return bf16 ? double(bf16_bits_to_f32(h)) : double(f16_bits_to_f32(h));
}

// Fragments distributed with the PTX ISA's formulas written out here, independently of layouts.h.
std::string test_mma(bool bf16) {
  const int warps = 4;
  std::mt19937 rng(bf16 ? 11 : 5);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<uint32_t> a(warps * 32 * 4), b(warps * 32 * 2);
  std::vector<float> c(warps * 32 * 4), d(warps * 32 * 4, NAN);
  std::vector<std::vector<uint16_t>> A(warps, std::vector<uint16_t>(16 * 16)),
      B(warps, std::vector<uint16_t>(16 * 8));
  std::vector<std::vector<float>> C(warps, std::vector<float>(16 * 8));
  for (int w = 0; w < warps; ++w) {
    for (auto& x : A[w]) x = to_bits(dist(rng), bf16);
    for (auto& x : B[w]) x = to_bits(dist(rng), bf16);  // B[k * 8 + n]
    for (auto& x : C[w]) x = dist(rng);
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, q = lane & 3, t = w * 32 + lane;
      auto pa = [&](int r, int col) {
        return pack_b16x2(A[w][r * 16 + col], A[w][r * 16 + col + 1]);
      };
      auto pb = [&](int k, int n) { return pack_b16x2(B[w][k * 8 + n], B[w][(k + 1) * 8 + n]); };
      a[4 * t + 0] = pa(g, 2 * q);
      a[4 * t + 1] = pa(g + 8, 2 * q);
      a[4 * t + 2] = pa(g, 2 * q + 8);
      a[4 * t + 3] = pa(g + 8, 2 * q + 8);
      b[2 * t + 0] = pb(2 * q, g);
      b[2 * t + 1] = pb(2 * q + 8, g);
      c[4 * t + 0] = C[w][g * 8 + 2 * q];
      c[4 * t + 1] = C[w][g * 8 + 2 * q + 1];
      c[4 * t + 2] = C[w][(g + 8) * 8 + 2 * q];
      c[4 * t + 3] = C[w][(g + 8) * 8 + 2 * q + 1];
    }
  }
  st::launch_mma(bf16, a.data(), b.data(), c.data(), d.data(), warps);
  double worst = 0;
  for (int w = 0; w < warps; ++w)
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i) {
        const int g = lane >> 2, q = lane & 3;
        const int row = g + 8 * (i >> 1), col = 2 * q + (i & 1);
        double ab = 0, mag = 0;
        for (int k = 0; k < 16; ++k) {
          const double p = from_bits(A[w][row * 16 + k], bf16) * from_bits(B[w][k * 8 + col], bf16);
          ab += p;
          mag += std::fabs(p);
        }
        const double want = 2 * ab + C[w][row * 8 + col];
        const double got = d[4 * (w * 32 + lane) + i];
        const double err = std::fabs(got - want), tol = 4e-7 * (2 * mag + 1);
        worst = std::max(worst, err / tol);
        if (!(err <= tol))
          failf("warp %d D[%d][%d] (lane %d, c%d): %.9g, expected %.9g", w, row, col, lane, i, got,
                want);
      }
  char buf[128];
  std::snprintf(buf, sizeof buf,
                "4 random problems, D = A*B + (A*B + C), worst error %.2f of tolerance", worst);
  return buf;
}

// tf32 (PTX cvt.rna.tf32.f32): ties away from zero, specials kept; the fragments written out with
// the PTX ISA's m16n8k8 .tf32 formulas, independently of layouts.h; products of the rounded
// operands against the double reference.
double tf32_value(float x) {
  const uint32_t b = float_bits(x);
  const double mag = std::fabs(double(x));
  if (!std::isfinite(x)) return x;
  // the two tf32 neighbours around x: truncation and one step (2^13 units of the f32 pattern) up
  const double lo = std::fabs(double(bits_float(b & 0xffffe000u)));
  const double hi = std::fabs(double(bits_float((b & 0xffffe000u) + 0x2000u)));
  const double r = (mag - lo < hi - mag) ? lo : hi;  // a tie goes away from zero
  return x < 0 ? -r : r;
}

std::string test_mma_tf32() {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200000; ++trial) {
    const float x = bits_float(uint32_t(rng()) & 0xbfffffffu);  // |x| < 2: every exponent below
    const double want = tf32_value(x), got = bits_float(f32_to_tf32_bits(x));
    if (!(got == want || (std::isnan(got) && std::isnan(want))))
      failf("tf32(%.9g) = %.9g, expected %.9g", double(x), got, want);
  }
  if (bits_float(f32_to_tf32_bits(1.0f + 0x1p-11f)) != 1.0f + 0x1p-10f ||  // a tie: away from 0
      bits_float(f32_to_tf32_bits(-1.0f - 0x1p-11f)) != -1.0f - 0x1p-10f ||
      f32_to_tf32_bits(INFINITY) != 0x7f800000u ||
      !std::isinf(bits_float(f32_to_tf32_bits(3.4028235e38f))) ||
      !std::isnan(bits_float(f32_to_tf32_bits(NAN))) ||
      // a NaN whose payload is only in the bits the instruction ignores stays a NaN
      !std::isnan(bits_float(f32_to_tf32_bits(bits_float(0x7f800001u)) & 0xffffe000u)))
    failf("tf32 rounding of ties, infinities, overflow or NaN");
  const int warps = 4;
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<uint32_t> a(warps * 32 * 4), b(warps * 32 * 2);
  std::vector<float> c(warps * 32 * 4), d(warps * 32 * 4, NAN);
  std::vector<std::vector<float>> A(warps, std::vector<float>(16 * 8)),
      B(warps, std::vector<float>(8 * 8)), C(warps, std::vector<float>(16 * 8));
  for (int w = 0; w < warps; ++w) {
    for (auto& x : A[w]) x = dist(rng);
    for (auto& x : B[w]) x = dist(rng);  // B[k * 8 + n]
    for (auto& x : C[w]) x = dist(rng);
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, q = lane & 3, t = w * 32 + lane;
      a[4 * t + 0] = float_bits(A[w][g * 8 + q]);
      a[4 * t + 1] = float_bits(A[w][(g + 8) * 8 + q]);
      a[4 * t + 2] = float_bits(A[w][g * 8 + q + 4]);
      a[4 * t + 3] = float_bits(A[w][(g + 8) * 8 + q + 4]);
      b[2 * t + 0] = float_bits(B[w][q * 8 + g]);
      b[2 * t + 1] = float_bits(B[w][(q + 4) * 8 + g]);
      c[4 * t + 0] = C[w][g * 8 + 2 * q];
      c[4 * t + 1] = C[w][g * 8 + 2 * q + 1];
      c[4 * t + 2] = C[w][(g + 8) * 8 + 2 * q];
      c[4 * t + 3] = C[w][(g + 8) * 8 + 2 * q + 1];
    }
  }
  st::launch_mma_tf32(a.data(), b.data(), c.data(), d.data(), warps);
  double worst = 0;
  for (int w = 0; w < warps; ++w)
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i) {
        const int g = lane >> 2, q = lane & 3;
        const int row = g + 8 * (i >> 1), col = 2 * q + (i & 1);
        double ab = 0, mag = 0;
        for (int k = 0; k < 8; ++k) {
          const double p = tf32_value(A[w][row * 8 + k]) * tf32_value(B[w][k * 8 + col]);
          ab += p;
          mag += std::fabs(p);
        }
        const double want = 2 * ab + C[w][row * 8 + col];
        const double got = d[4 * (w * 32 + lane) + i];
        const double err = std::fabs(got - want), tol = 4e-7 * (2 * mag + 1);
        worst = std::max(worst, err / tol);
        if (!(err <= tol))
          failf("warp %d D[%d][%d] (lane %d, c%d): %.9g, expected %.9g", w, row, col, lane, i, got,
                want);
      }
  char buf[160];
  std::snprintf(buf, sizeof buf,
                "tf32 rounding of 200000 floats; 4 random problems, D = A*B + (A*B + C), worst "
                "error %.2f of tolerance",
                worst);
  return buf;
}

int inverse_phys(int p) {
  return (13 * (p - 3 + 32)) & 31;
}  // phys(l) = (5 l + 3) % 32

std::vector<uint32_t> run_ldmatrix(const std::vector<uint16_t>& rows) {
  std::vector<uint32_t> out(st::kLdmatrixVariants * 32 * 4, 0xdeadbeefu);
  st::launch_ldmatrix(rows.data(), out.data());
  return out;
}

std::string test_ldmatrix() {
  std::vector<uint16_t> rows(32 * 8);
  std::mt19937 rng(3);
  for (auto& v : rows) v = uint16_t(rng());
  const std::vector<uint32_t> out = run_ldmatrix(rows);
  // Matrix j row r comes from the address lane 8 j + r gave: physical row (5 (8 j + r) + 3) % 32.
  auto logical = [&](int j, int r, int col) {
    return rows[((5 * (8 * j + r) + 3) & 31) * 8 + col];
  };
  const int counts[st::kLdmatrixVariants] = {1, 2, 4, 1, 2, 4};
  for (int v = 0; v < st::kLdmatrixVariants; ++v) {
    const bool trans = v >= 3;
    for (int lane = 0; lane < 32; ++lane)
      for (int j = 0; j < 4; ++j) {
        uint32_t want = 0;
        if (j < counts[v]) {
          const int g = lane / 4, q = lane % 4;
          want = trans ? pack_b16x2(logical(j, 2 * q, g), logical(j, 2 * q + 1, g))
                       : pack_b16x2(logical(j, g, 2 * q), logical(j, g, 2 * q + 1));
        }
        expect_eq("ldmatrix register", size_t((v * 32 + lane) * 4 + j),
                  out[(v * 32 + lane) * 4 + j], want);
      }
  }
  return "x1/x2/x4 and .trans, permuted row addresses, ignored lanes' addresses untouched";
}

std::string test_cp_async() {
  std::vector<uint32_t> in(st::kCpAsyncIn), out(st::kCpAsyncOut, 0xdeadbeefu);
  for (size_t i = 0; i < in.size(); ++i) in[i] = uint32_t(i * 2654435761u) | 1u;
  st::launch_cp_async(in.data(), out.data());
  const int n = st::kCpAsyncThreads;
  for (int t = 0; t < n; ++t) {
    const int nb = (t + 1) % n;
    expect_eq("after wait_group<3>", size_t(t), out[t], in[4 * t]);
    for (int k = 0; k < 4; ++k)
      expect_eq("16-byte copy", size_t(t), out[64 + 4 * t + k], in[4 * nb + k]);
    for (int k = 0; k < 2; ++k)
      expect_eq("8-byte copy", size_t(t), out[320 + 2 * t + k], in[256 + 2 * nb + k]);
    expect_eq("4-byte copy", size_t(t), out[448 + t], in[384 + nb]);
    for (int k = 0; k < 4; ++k)
      expect_eq("zero-filled copy", size_t(t), out[512 + 4 * t + k],
                k < nb % 5 ? in[448 + 4 * nb + k] : 0u);
  }
  return "4/8/16-byte copies, zfill, 4 groups (one empty), wait_group<3> then <0>";
}

std::string test_gemm(bool bf16) {
  const int m = 150, n = 136, k = 200;  // none a multiple of the 64x64x32 tile
  std::mt19937 rng(bf16 ? 23 : 17);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<uint16_t> a(size_t(m) * k), b(size_t(k) * n);
  for (auto& x : a) x = to_bits(dist(rng), bf16);
  for (auto& x : b) x = to_bits(dist(rng), bf16);
  std::vector<float> c(size_t(m) * n, NAN);
  const auto t0 = std::chrono::steady_clock::now();
  st::launch_gemm(bf16, a.data(), b.data(), c.data(), m, n, k);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double worst = 0;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double want = 0, mag = 0;
      for (int p = 0; p < k; ++p) {
        const double x =
            from_bits(a[size_t(i) * k + p], bf16) * from_bits(b[size_t(p) * n + j], bf16);
        want += x;
        mag += std::fabs(x);
      }
      const double got = c[size_t(i) * n + j];
      const double err = std::fabs(got - want), tol = 1e-5 * mag + 1e-6;  // f32 accumulation
      worst = std::max(worst, err / tol);
      if (!(err <= tol)) failf("C[%d][%d] = %.9g, expected %.9g", i, j, got, want);
    }
  char buf[160];
  std::snprintf(buf, sizeof buf,
                "M=%d N=%d K=%d, 64x64x32 tiles, 4 warps: worst error %.3f of tolerance, %.2f s", m,
                n, k, worst, secs);
  return buf;
}

// C = A B through the wgmma self-test GEMM; returns the worst error as a share of the tolerance.
double run_wgmma_gemm(const st::wgmma_gemm_config& cfg, int m, int k, uint32_t seed) {
  const int n = cfg.n;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<uint16_t> a(size_t(m) * k), b(size_t(k) * n);
  for (auto& x : a) x = to_bits(dist(rng), cfg.bf16);
  for (auto& x : b) x = to_bits(dist(rng), cfg.bf16);
  std::vector<float> c(size_t(m) * n, NAN);
  st::launch_wgmma_gemm(cfg, a.data(), b.data(), c.data(), m, k);
  double worst = 0;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double want = 0, mag = 0;
      for (int p = 0; p < k; ++p) {
        const uint16_t bv = cfg.b_mn_major ? b[size_t(p) * n + j] : b[size_t(j) * k + p];
        const double x = from_bits(a[size_t(i) * k + p], cfg.bf16) * from_bits(bv, cfg.bf16);
        want += x;
        mag += std::fabs(x);
      }
      const double got = c[size_t(i) * n + j];
      const double err = std::fabs(got - want), tol = 1e-5 * mag + 1e-6;  // f32 accumulation
      worst = std::max(worst, err / tol);
      if (!(err <= tol))
        failf("n=%d swizzle=%d a_regs=%d b_mn_major=%d: C[%d][%d] = %.9g, expected %.9g", n,
              cfg.swizzle, int(cfg.a_in_registers), int(cfg.b_mn_major), i, j, got, want);
    }
  return worst;
}

// Every width, swizzle mode, A source and B major-ness.
std::string test_wgmma(bool bf16) {
  const auto t0 = std::chrono::steady_clock::now();
  double worst = 0;
  int configs = 0;
  uint32_t seed = bf16 ? 41 : 31;
  for (int n : {16, 32, 64, 128})
    for (int swizzle = 0; swizzle < 4; ++swizzle)
      for (bool a_regs : {false, true})
        for (bool b_mn : {false, true}) {
          st::wgmma_gemm_config cfg;
          cfg.bf16 = bf16;
          cfg.n = n;
          cfg.swizzle = swizzle;
          cfg.a_in_registers = a_regs;
          cfg.b_mn_major = b_mn;
          worst = std::max(worst, run_wgmma_gemm(cfg, 128, 128, seed++));
          ++configs;
        }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  char buf[160];
  std::snprintf(buf, sizeof buf,
                "M=128 K=128, %d configurations (N, swizzle, A source, B major): worst error %.3f "
                "of tolerance, %.2f s",
                configs, worst, secs);
  return buf;
}

// ---- planted bugs ------------------------------------------------------------------------------

struct bug_test {
  std::vector<std::string> kinds;  // accepted report kinds
  std::function<void()> run;
};

std::vector<float> floats(size_t n) {
  return std::vector<float>(n, 1.0f);
}

void bug_oob() {
  auto in = floats(100), out = floats(101);
  st::launch_bug_oob(in.data(), out.data(), 100);
}
void bug_misaligned() {
  auto in = floats(4 * 32 + 4), out = floats(32);
  st::launch_bug_misaligned(in.data(), out.data());
}
void bug_barrier_exit() {
  auto out = floats(64);
  st::launch_bug_barrier_exit(out.data());
}
void bug_barrier_sites() {
  auto out = floats(64);
  st::launch_bug_barrier_sites(out.data());
}
void bug_shfl_half() {
  std::vector<int> out(32);
  st::launch_bug_shfl_half(out.data());
}
void bug_race() {
  auto out = floats(32);
  st::launch_bug_race(out.data());
}
void bug_warp_race() {
  std::vector<uint32_t> out(64);
  st::launch_warp_exchange(out.data(), false);
}
void bug_cp_async_early() {
  std::vector<uint32_t> in(4 * 32, 5), out(32);
  st::launch_bug_cp_async_early(in.data(), out.data());
}
void bug_wgmma(st::wgmma_bug bug) {
  st::wgmma_gemm_config cfg;
  cfg.bug = bug;
  run_wgmma_gemm(cfg, 64, 128, 7);
}
void bug_shared_oob() {
  auto out = floats(32);
  st::launch_bug_shared_oob(out.data());
}
void bug_uninitialized() {
  auto out = floats(32);
  st::launch_bug_uninitialized(out.data());
}
void bug_unregistered() {
  auto in = floats(64), out = floats(64);
  st::launch_bug_unregistered(in.data(), out.data(), 16);
}
void bug_shfl_barrier() {
  std::vector<int> out(32);
  st::launch_bug_shfl_barrier(out.data());
}
void bug_collective_mismatch() {
  std::vector<uint32_t> out(32);
  st::launch_bug_collective_mismatch(out.data());
}
void bug_atomics_then_read() {
  std::vector<int> out(1);
  st::launch_bug_atomics_then_read(out.data());
}
void bug_read_then_atomics() {
  std::vector<int> out(1);
  st::launch_bug_read_then_atomics(out.data());
}
void bug_write_then_atomics() {
  std::vector<int> out(1);
  st::launch_bug_write_then_atomics(out.data());
}
void bug_spin_warp() {
  std::vector<int> out(32);
  st::launch_bug_spin_warp(out.data());
}
void bug_spin_blocks() {
  int flag = 0;
  st::launch_bug_spin_blocks(&flag);
}
void bug_packed_views(int how) {
  const int n = 32;
  std::vector<float> packed(2 * n, 1.0f), out(n);
  st::launch_bug_packed_views(packed.data(), out.data(), n, how);
}
void bug_shared_views() {
  auto out = floats(32);
  st::launch_bug_shared_views(out.data());
}
void bug_pipeline_race() {
  const int m = 64, n = 64, k = 96;
  std::vector<uint16_t> a(size_t(m) * k, 0x3c00), b(size_t(k) * n, 0x3c00);
  std::vector<float> c(size_t(m) * n);
  st::launch_gemm(false, a.data(), b.data(), c.data(), m, n, k, /*trailing_barrier=*/false);
}

// ---- registry ----------------------------------------------------------------------------------

struct positive_test {
  const char* name;
  std::function<std::string()> run;
};

const std::vector<positive_test>& positives() {
  static const std::vector<positive_test> v = {
      {"indices", test_indices},
      {"registered", test_registered},
      {"math", test_math},
      {"conversions", test_conversions},
      {"shuffles", test_shuffles},
      {"votes", test_votes},
      {"warp_sync", test_warp_sync},
      {"reduce", test_reduce},
      {"atomics", test_atomics},
      {"atomic_warp", test_atomic_warp},
      {"math_approx", test_math_approx},
      {"vec128", test_vec128},
      {"mma_f16", [] { return test_mma(false); }},
      {"mma_bf16", [] { return test_mma(true); }},
      {"mma_tf32", [] { return test_mma_tf32(); }},
      {"ldmatrix", test_ldmatrix},
      {"cp_async", test_cp_async},
      {"gemm_f16", [] { return test_gemm(false); }},
      {"gemm_bf16", [] { return test_gemm(true); }},
      {"wgmma_f16", [] { return test_wgmma(false); }},
      {"wgmma_bf16", [] { return test_wgmma(true); }},
  };
  return v;
}

const std::vector<std::pair<const char*, bug_test>>& bugs() {
  static const std::vector<std::pair<const char*, bug_test>> v = {
      {"bug_oob_global", {{"out-of-bounds global read"}, bug_oob}},
      {"bug_misaligned", {{"misaligned global access"}, bug_misaligned}},
      {"bug_barrier_exit", {{"barrier divergence"}, bug_barrier_exit}},
      {"bug_barrier_sites", {{"barrier divergence"}, bug_barrier_sites}},
      {"bug_shfl_half", {{"incomplete warp collective"}, bug_shfl_half}},
      {"bug_race", {{"shared memory race"}, bug_race}},
      {"bug_warp_race", {{"shared memory race"}, bug_warp_race}},
      {"bug_cp_async_early", {{"read of pending cp.async destination"}, bug_cp_async_early}},
      {"bug_shared_oob", {{"out-of-bounds shared write"}, bug_shared_oob}},
      {"bug_uninitialized", {{"uninitialized shared read"}, bug_uninitialized}},
      {"bug_unregistered", {{"out-of-bounds global read"}, bug_unregistered}},
      {"bug_shfl_barrier", {{"incomplete warp collective"}, bug_shfl_barrier}},
      {"bug_collective_mismatch", {{"incomplete warp collective"}, bug_collective_mismatch}},
      {"bug_pipeline_race",
       {{"shared memory race", "read of pending cp.async destination"}, bug_pipeline_race}},
      {"bug_atomics_then_read", {{"shared memory race"}, bug_atomics_then_read}},
      {"bug_read_then_atomics", {{"shared memory race"}, bug_read_then_atomics}},
      {"bug_write_then_atomics", {{"shared memory race"}, bug_write_then_atomics}},
      {"bug_spin_warp", {{"no progress"}, bug_spin_warp}},
      {"bug_spin_blocks", {{"no progress"}, bug_spin_blocks}},
      {"bug_packed_views", {{"out-of-bounds global read"}, [] { bug_packed_views(0); }}},
      {"bug_packed_host_ptrs", {{"out-of-bounds global read"}, [] { bug_packed_views(1); }}},
      {"bug_packed_params", {{"out-of-bounds global read"}, [] { bug_packed_views(2); }}},
      {"bug_shared_views", {{"out-of-bounds shared write"}, bug_shared_views}},
      {"bug_wgmma_no_fence", {{"wgmma without fence"}, [] { bug_wgmma(st::wgmma_bug::no_fence); }}},
      {"bug_wgmma_no_proxy_fence",
       {{"unfenced generic write read by wgmma"},
        [] { bug_wgmma(st::wgmma_bug::no_proxy_fence); }}},
      {"bug_wgmma_no_wait",
       {{"wgmma in flight at exit"}, [] { bug_wgmma(st::wgmma_bug::no_wait); }}},
      {"bug_wgmma_overwrite",
       {{"wgmma operand changed in flight"}, [] { bug_wgmma(st::wgmma_bug::overwrite_a); }}},
      {"bug_wgmma_accumulator",
       {{"wgmma operand changed in flight"}, [] { bug_wgmma(st::wgmma_bug::touch_accumulator); }}},
  };
  return v;
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool run_positive(const positive_test& t) {
  const double t0 = now();
  try {
    const std::string detail = t.run();
    std::printf("PASS %s (%.0f ms): %s\n", t.name, 1e3 * (now() - t0), detail.c_str());
    return true;
  } catch (const emulator_error& e) {
    std::printf("FAIL %s: unexpected emulator report [%s]\n%s\n", t.name, e.kind().c_str(),
                e.what());
  } catch (const std::exception& e) {
    std::printf("FAIL %s: %s\n", t.name, e.what());
  }
  return false;
}

bool run_bug(const char* name, const bug_test& t) {
  const double t0 = now();
  try {
    t.run();
  } catch (const emulator_error& e) {
    for (const std::string& k : t.kinds)
      if (e.kind() == k) {
        std::printf("REPORTED %s [%s] (%.0f ms)\n%s\n", name, e.kind().c_str(), 1e3 * (now() - t0),
                    e.what());
        return true;
      }
    std::printf("FAIL %s: reported as [%s], expected [%s]\n%s\n", name, e.kind().c_str(),
                t.kinds[0].c_str(), e.what());
    return false;
  }
  std::printf("FAIL %s: the planted bug was not reported\n", name);
  return false;
}

int print_layouts() {
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 8; ++i) {
      const layout::coord e = layout::mma_m16n8k16_a(lane, i);
      std::printf("mma_a %d %d %d %d\n", lane, i, e.row, e.col);
    }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const layout::coord e = layout::mma_m16n8k16_b(lane, i);
      std::printf("mma_b %d %d %d %d\n", lane, i, e.row, e.col);
    }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const layout::coord e = layout::mma_m16n8k16_c(lane, i);
      std::printf("mma_c %d %d %d %d\n", lane, i, e.row, e.col);
    }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const layout::coord e = layout::mma_m16n8k8_tf32_a(lane, i);
      std::printf("tf32_mma_a %d %d %d %d\n", lane, i, e.row, e.col);
    }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 2; ++i) {
      const layout::coord e = layout::mma_m16n8k8_tf32_b(lane, i);
      std::printf("tf32_mma_b %d %d %d %d\n", lane, i, e.row, e.col);
    }
  // ldmatrix, probed: physical row p holds the values 8 p + col.
  std::vector<uint16_t> rows(32 * 8);
  for (int i = 0; i < 32 * 8; ++i) rows[i] = uint16_t(i);
  const std::vector<uint32_t> out = run_ldmatrix(rows);
  const char* names[st::kLdmatrixVariants] = {"x1", "x2", "x4", "x1_trans", "x2_trans", "x4_trans"};
  const int counts[st::kLdmatrixVariants] = {1, 2, 4, 1, 2, 4};
  for (int v = 0; v < st::kLdmatrixVariants; ++v)
    for (int lane = 0; lane < 32; ++lane)
      for (int j = 0; j < counts[v]; ++j)
        for (int h = 0; h < 2; ++h) {
          const int value = int(out[(v * 32 + lane) * 4 + j] >> (16 * h)) & 0xffff;
          const int l = inverse_phys(value / 8);  // the lane whose address was read
          std::printf("ldsm_%s %d %d %d %d %d %d\n", names[v], lane, j, h, l / 8, l % 8, value % 8);
        }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s list | all | layouts | <test> [--workers N]\n", argv[0]);
    return 2;
  }
  for (int i = 2; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--workers") == 0) set_workers(std::atoi(argv[i + 1]));
  const std::string cmd = argv[1];
  if (cmd == "list") {
    for (const auto& t : positives()) std::printf("%s\n", t.name);
    for (const auto& b : bugs()) std::printf("%s\n", b.first);
    return 0;
  }
  if (cmd == "layouts") return print_layouts();
  if (cmd == "all") {
    const double t0 = now();
    int failed = 0, total = 0;
    for (const auto& t : positives()) failed += !run_positive(t), ++total;
    for (const auto& b : bugs()) failed += !run_bug(b.first, b.second), ++total;
    std::printf("%d of %d self-tests passed in %.2f s\n", total - failed, total, now() - t0);
    return failed ? 1 : 0;
  }
  for (const auto& t : positives())
    if (cmd == t.name) return run_positive(t) ? 0 : 1;
  for (const auto& b : bugs())
    if (cmd == b.first) return run_bug(b.first, b.second) ? 0 : 1;
  std::fprintf(stderr, "unknown self-test '%s' (try: %s list)\n", cmd.c_str(), argv[0]);
  return 2;
}
