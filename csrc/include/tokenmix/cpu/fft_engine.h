// The CPU FFT engine of the FFT-mixing family: transforms along the token axis of a block of
// channels, with one SIMD lane per channel. Every butterfly is a vector operation over
// Simd<T>::kWidth channels, so no transform needs shuffles or transposes, whatever its length.
//
// - Mixed radix (4, 2, 3 and any prime up to kFftMaxDirectPrime), Stockham autosort: every pass
//   reads one buffer and writes the other in natural order, so there is no bit-reversal pass.
// - Lengths with a larger prime factor use Bluestein's algorithm: a chirp, a smooth-length
//   circular convolution, a chirp.
// - Real transforms of even length n run one complex transform of n/2 (even samples in the real
//   part, odd in the imaginary part) and a split pass; odd lengths run a complex transform of n.
// Twiddles are computed in double precision, each from its exact angle.
#pragma once

#include <cmath>
#include <cstdint>

#include "tokenmix/cpu/simd.h"
#include "tokenmix/fft_problem.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

// One complex value per lane.
template <class T>
struct CVec {
  typename Simd<T>::V re, im;
};

template <class T>
inline CVec<T> cadd(CVec<T> a, CVec<T> b) {
  return {a.re + b.re, a.im + b.im};
}
template <class T>
inline CVec<T> csub(CVec<T> a, CVec<T> b) {
  return {a.re - b.re, a.im - b.im};
}
// a * (wr + i wi) for scalars wr, wi (broadcast to every lane).
template <class T>
inline CVec<T> cmul_scalar(CVec<T> a, T wr, T wi) {
  return {a.re * wr - a.im * wi, a.re * wi + a.im * wr};
}
template <class T>
inline CVec<T> cmul(CVec<T> a, CVec<T> b) {
  return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}
// a * conj(b)
template <class T>
inline CVec<T> cmul_conj(CVec<T> a, CVec<T> b) {
  return {a.re * b.re + a.im * b.im, a.im * b.re - a.re * b.im};
}
// -i * a (forward) or +i * a (inverse)
template <class T, bool kInverse>
inline CVec<T> rotate_quarter(CVec<T> a) {
  if (kInverse) return {-a.im, a.re};
  return {a.im, -a.re};
}
template <class T>
inline CVec<T> czero() {
  return {typename Simd<T>::V{}, typename Simd<T>::V{}};
}

// e^{-2 pi i num / den} in double, from the exact fraction num / den (num reduced mod den).
inline void unit_root(int64_t num, int64_t den, double* re, double* im) {
  num %= den;
  if (num < 0) num += den;
  const double angle = -2.0 * M_PI * double(num) / double(den);
  *re = std::cos(angle);
  *im = std::sin(angle);
}

// A mixed-radix Stockham plan of a length with no prime factor above kFftMaxDirectPrime.
template <class T>
struct StockhamPlan {
  static constexpr int kMaxStages = 64;
  int64_t n = 1;
  int stages = 0;
  int radix[kMaxStages];
  int64_t twiddle_offset[kMaxStages];  // complex entries into twiddles
  int64_t root_offset[kMaxStages];     // real entries into roots (odd primes >= 5)
  Buffer<T> twiddles;                  // stage: [m][p - 1] complex, e^{-2 pi i j t / n_stage}
  Buffer<T> roots;                     // stage: [p/2][p/2] cos, then sin, of 2 pi r t / p

  // False when n has a prime factor above kFftMaxDirectPrime.
  bool init(int64_t length) {
    n = length;
    stages = fft_factorize(length, radix, kMaxStages);
    if (stages < 0) return false;
    int64_t tw = 0, rt = 0, cur = n;
    for (int s = 0; s < stages; ++s) {
      twiddle_offset[s] = tw;
      root_offset[s] = rt;
      tw += (cur / radix[s]) * (radix[s] - 1);
      if (radix[s] >= 5) rt += 2 * (radix[s] / 2) * (radix[s] / 2);
      cur /= radix[s];
    }
    twiddles.allocate(size_t(2 * tw + 2));
    roots.allocate(size_t(rt + 2));
    cur = n;
    for (int s = 0; s < stages; ++s) {
      const int p = radix[s];
      const int64_t m = cur / p;
      T* w = twiddles.data() + 2 * twiddle_offset[s];
      for (int64_t j = 0; j < m; ++j)
        for (int t = 1; t < p; ++t) {
          double re, im;
          unit_root(j * t, cur, &re, &im);
          *w++ = T(re);
          *w++ = T(im);
        }
      if (p >= 5) {
        const int h = p / 2;
        T* r = roots.data() + root_offset[s];
        for (int a = 1; a <= h; ++a)
          for (int b = 1; b <= h; ++b) {
            double re, im;
            unit_root(int64_t(a) * b, p, &re, &im);
            r[(a - 1) * h + (b - 1)] = T(re);
            r[h * h + (a - 1) * h + (b - 1)] = T(-im);  // sin(2 pi a b / p)
          }
      }
      cur = m;
    }
    return true;
  }
};

// One Stockham pass of radix p: `in` holds s interleaved transforms of length p * m at stride s;
// `out` receives, for each, p transforms of length m at stride s * p, already twiddled.
template <class T, bool kInverse>
void stockham_pass(const StockhamPlan<T>& plan, int stage, int64_t m, int64_t s, const CVec<T>* in,
                   CVec<T>* out) {
  const int p = plan.radix[stage];
  const T* tw_base = plan.twiddles.data() + 2 * plan.twiddle_offset[stage];
  const T sign = kInverse ? T(-1) : T(1);  // the odd-prime butterfly's rotation: -i, or +i
  auto twiddle = [&](CVec<T> a, const T* w) {
    return cmul_scalar(a, w[0], kInverse ? -w[1] : w[1]);
  };
  for (int64_t j = 0; j < m; ++j) {
    const T* w = tw_base + 2 * j * (p - 1);
    const CVec<T>* src = in + s * j;
    CVec<T>* dst = out + s * p * j;
    if (p == 4) {
      for (int64_t q = 0; q < s; ++q) {
        const CVec<T> a0 = src[q], a1 = src[q + s * m], a2 = src[q + 2 * s * m],
                      a3 = src[q + 3 * s * m];
        const CVec<T> t02p = cadd(a0, a2), t02m = csub(a0, a2);
        const CVec<T> t13p = cadd(a1, a3), t13m = rotate_quarter<T, kInverse>(csub(a1, a3));
        dst[q] = cadd(t02p, t13p);
        dst[q + s] = twiddle(cadd(t02m, t13m), w);
        dst[q + 2 * s] = twiddle(csub(t02p, t13p), w + 2);
        dst[q + 3 * s] = twiddle(csub(t02m, t13m), w + 4);
      }
    } else if (p == 2) {
      for (int64_t q = 0; q < s; ++q) {
        const CVec<T> a0 = src[q], a1 = src[q + s * m];
        dst[q] = cadd(a0, a1);
        dst[q + s] = twiddle(csub(a0, a1), w);
      }
    } else if (p == 3) {
      const T half_sqrt3 = T(0.86602540378443864676);
      for (int64_t q = 0; q < s; ++q) {
        const CVec<T> a0 = src[q], a1 = src[q + s * m], a2 = src[q + 2 * s * m];
        const CVec<T> sum = cadd(a1, a2);
        const CVec<T> mid = {a0.re - T(0.5) * sum.re, a0.im - T(0.5) * sum.im};
        const CVec<T> d = rotate_quarter<T, kInverse>(csub(a1, a2));  // -i (a1 - a2) forward
        const CVec<T> dd = {d.re * half_sqrt3, d.im * half_sqrt3};
        dst[q] = cadd(a0, sum);
        dst[q + s] = twiddle(cadd(mid, dd), w);
        dst[q + 2 * s] = twiddle(csub(mid, dd), w + 2);
      }
    } else {
      // Any odd prime: b_t = a0 + sum_r [(a_r + a_{p-r}) cos - i (a_r - a_{p-r}) sin](2 pi r t /
      // p).
      const int h = p / 2;
      const T* cosines = plan.roots.data() + plan.root_offset[stage];
      const T* sines = cosines + h * h;
      CVec<T> sp[kFftMaxDirectPrime / 2 + 1], sm[kFftMaxDirectPrime / 2 + 1];
      for (int64_t q = 0; q < s; ++q) {
        const CVec<T> a0 = src[q];
        CVec<T> total = a0;
        for (int r = 1; r <= h; ++r) {
          const CVec<T> ar = src[q + s * m * r], br = src[q + s * m * (p - r)];
          sp[r] = cadd(ar, br);
          sm[r] = csub(ar, br);
          total = cadd(total, sp[r]);
        }
        dst[q] = total;
        for (int t = 1; t <= h; ++t) {
          CVec<T> c = a0, sn = czero<T>();
          for (int r = 1; r <= h; ++r) {
            const T cs = cosines[(r - 1) * h + (t - 1)], sv = sines[(r - 1) * h + (t - 1)];
            c.re += sp[r].re * cs;
            c.im += sp[r].im * cs;
            sn.re += sm[r].re * sv;
            sn.im += sm[r].im * sv;
          }
          // forward: b_t = c - i sn, b_{p-t} = c + i sn; the inverse swaps them.
          const CVec<T> isn = {sign * sn.im, -sign * sn.re};  // -i sn (forward), +i sn (inverse)
          dst[q + s * t] = twiddle(cadd(c, isn), w + 2 * (t - 1));
          dst[q + s * (p - t)] = twiddle(csub(c, isn), w + 2 * (p - t - 1));
        }
      }
    }
  }
}

// Unnormalized transform of plan.n complex vectors in place (forward: e^{-2 pi i}; inverse:
// e^{+2 pi i}). work holds plan.n vectors.
template <class T, bool kInverse>
void stockham_transform(const StockhamPlan<T>& plan, CVec<T>* data, CVec<T>* work) {
  CVec<T>* bufs[2] = {data, work};
  int64_t cur = plan.n, s = 1;
  for (int st = 0; st < plan.stages; ++st) {
    const int64_t m = cur / plan.radix[st];
    stockham_pass<T, kInverse>(plan, st, m, s, bufs[st & 1], bufs[(st + 1) & 1]);
    s *= plan.radix[st];
    cur = m;
  }
  if (plan.stages & 1)
    for (int64_t i = 0; i < plan.n; ++i) data[i] = work[i];
}

// A smooth-length transform that stays in cache: plain Stockham while the data and its work
// buffer fit in L2; beyond that the four-step split n = n1 * n2, whose column transforms (n1
// elements at stride n2) and row transforms (n2 contiguous elements) each fit in L1, so the
// data makes two trips through memory instead of one per Stockham pass:
//   1. for each n2: the n1-point transform of x[n2 + n2_count * j] over j, times
//      e^{-2 pi i n2 k1 / n}, to work[n2_count * k1 + n2];
//   2. for each k1: the n2-point transform of that row, scattered to data[k1 + n1 * k2].
template <class T>
struct CorePlan {
  // Data plus work beyond this many bytes goes four-step (L2 is 1-2 MiB per core).
  static constexpr int64_t kInCacheBytes = int64_t(1) << 20;
  int64_t n = 1;
  bool four_step = false;
  StockhamPlan<T> direct;  // of n (plain), or of n1 (four-step columns)
  StockhamPlan<T> rows;    // of n2 (four-step)
  int64_t n1 = 1, n2 = 1;
  Buffer<T> twiddles;  // [n2][n1] complex e^{-2 pi i n2 k1 / n} (four-step)

  bool init(int64_t length) {
    n = length;
    four_step = false;
    int probe[StockhamPlan<T>::kMaxStages];
    if (fft_factorize(length, probe, StockhamPlan<T>::kMaxStages) < 0) return false;
    if (2 * length * int64_t(sizeof(CVec<T>)) > kInCacheBytes) {
      // The largest divisor at most sqrt(n); tiny ones (n with two huge primes) stay plain.
      int64_t best = 1;
      for (int64_t d = 2; d * d <= length; ++d)
        if (length % d == 0) best = d;
      if (best >= 16) {
        four_step = true;
        n1 = best;
        n2 = length / best;
        direct.init(n1);
        rows.init(n2);
        twiddles.allocate(size_t(2 * length));
        for (int64_t b = 0; b < n2; ++b)
          for (int64_t k = 0; k < n1; ++k) {
            double re, im;
            unit_root(b * k, length, &re, &im);
            twiddles[size_t(2 * (b * n1 + k))] = T(re);
            twiddles[size_t(2 * (b * n1 + k) + 1)] = T(im);
          }
        return true;
      }
    }
    return direct.init(length);
  }
  int64_t work_elems() const { return four_step ? n + 2 * n1 + n2 : n; }
};

template <class T, bool kInverse>
void core_transform(const CorePlan<T>& plan, CVec<T>* data, CVec<T>* work) {
  if (!plan.four_step) return stockham_transform<T, kInverse>(plan.direct, data, work);
  const int64_t n1 = plan.n1, n2 = plan.n2;
  CVec<T>* col = work + plan.n;
  CVec<T>* col_work = col + n1;
  CVec<T>* row_work = col_work + n1;
  for (int64_t b = 0; b < n2; ++b) {
    for (int64_t j = 0; j < n1; ++j) col[j] = data[b + n2 * j];
    stockham_transform<T, kInverse>(plan.direct, col, col_work);
    const T* tw = plan.twiddles.data() + 2 * b * n1;
    for (int64_t k = 0; k < n1; ++k)
      work[n2 * k + b] = cmul_scalar(col[k], tw[2 * k], kInverse ? -tw[2 * k + 1] : tw[2 * k + 1]);
  }
  for (int64_t k = 0; k < n1; ++k) {
    CVec<T>* row = work + n2 * k;
    stockham_transform<T, kInverse>(plan.rows, row, row_work);
    for (int64_t j = 0; j < n2; ++j) data[k + n1 * j] = row[j];
  }
}

// A complex transform of any length: the cache-aware core, or Bluestein around a smooth-length
// core for lengths with a prime factor above kFftMaxDirectPrime.
template <class T>
struct FftPlan {
  int64_t n = 1;
  bool bluestein = false;
  CorePlan<T> core;     // of n, or of Bluestein's convolution length
  Buffer<T> chirp;      // [n] complex e^{-i pi j^2 / n}
  Buffer<T> chirp_hat;  // [M] complex: the transform of the conjugate chirp, times 1/M

  void init(int64_t length) {
    n = length;
    bluestein = !core.init(length);
    if (!bluestein) return;
    const int64_t m = fft_smooth_even_size(2 * length - 1);
    core.init(m);
    chirp.allocate(size_t(2 * length));
    for (int64_t j = 0; j < length; ++j) {
      // e^{-i pi j^2 / n} = e^{-2 pi i (j^2 mod 2n) / (2n)}
      const int64_t num = int64_t((unsigned __int128)(j)*j % (unsigned __int128)(2 * length));
      double re, im;
      unit_root(num, 2 * length, &re, &im);
      chirp[2 * j] = T(re);
      chirp[2 * j + 1] = T(im);
    }
    // Transform the conjugate chirp b[j] = b[M - j] = conj(chirp[j]) with the vector engine
    // (every lane the same), then keep lane 0.
    Buffer<CVec<T>> b, w;
    b.allocate(size_t(m));
    w.allocate(size_t(core.work_elems()));
    for (int64_t j = 0; j < m; ++j) b[j] = czero<T>();
    for (int64_t j = 0; j < length; ++j) {
      const CVec<T> c = {vbroadcast<typename Simd<T>::V>(chirp[2 * j]),
                         vbroadcast<typename Simd<T>::V>(-chirp[2 * j + 1])};
      b[j] = c;
      if (j > 0) b[m - j] = c;
    }
    core_transform<T, false>(core, b.data(), w.data());
    chirp_hat.allocate(size_t(2 * m));
    for (int64_t j = 0; j < m; ++j) {
      chirp_hat[2 * j] = b[j].re[0] / T(m);
      chirp_hat[2 * j + 1] = b[j].im[0] / T(m);
    }
  }
  // Vectors of work space a transform needs.
  int64_t work_elems() const { return bluestein ? core.n + core.work_elems() : core.work_elems(); }
};

template <class T, bool kInverse>
void fft_transform(const FftPlan<T>& plan, CVec<T>* data, CVec<T>* work) {
  if (!plan.bluestein) return core_transform<T, kInverse>(plan.core, data, work);
  // X[k] = c[k] sum_j (x[j] c[j]) conj(c[k - j]) with c[j] = e^{-i pi j^2 / n}; the inverse
  // conjugates c.
  const int64_t n = plan.n, m = plan.core.n;
  const T sign = kInverse ? T(-1) : T(1);
  CVec<T>* a = work;
  CVec<T>* scratch = work + m;
  for (int64_t j = 0; j < n; ++j)
    a[j] = cmul_scalar(data[j], plan.chirp[2 * j], sign * plan.chirp[2 * j + 1]);
  for (int64_t j = n; j < m; ++j) a[j] = czero<T>();
  core_transform<T, false>(plan.core, a, scratch);
  // The inverse's kernel is the conjugate chirp's conjugate: its transform is chirp_hat
  // mirrored and conjugated.
  for (int64_t j = 0; j < m; ++j) {
    if (!kInverse) {
      a[j] = cmul_scalar(a[j], plan.chirp_hat[2 * j], plan.chirp_hat[2 * j + 1]);
    } else {
      const int64_t jm = j == 0 ? 0 : m - j;
      a[j] = cmul_scalar(a[j], plan.chirp_hat[2 * jm], -plan.chirp_hat[2 * jm + 1]);
    }
  }
  core_transform<T, true>(plan.core, a, scratch);
  for (int64_t k = 0; k < n; ++k)
    data[k] = cmul_scalar(a[k], plan.chirp[2 * k], sign * plan.chirp[2 * k + 1]);
}

// Real transforms of length n along the token axis.
template <class T>
struct RealFftPlan {
  int64_t n = 1;
  bool even = false;
  FftPlan<T> complex_plan;  // n/2 when n is even, else n
  Buffer<T> split;          // [n/2] complex e^{-2 pi i k / n} (even n)

  void init(int64_t length) {
    n = length;
    even = length % 2 == 0;
    complex_plan.init(even ? length / 2 : length);
    if (even) {
      split.allocate(size_t(length + 2));
      for (int64_t k = 0; k < length / 2; ++k) {
        double re, im;
        unit_root(k, length, &re, &im);
        split[2 * k] = T(re);
        split[2 * k + 1] = T(im);
      }
    }
  }
  int64_t bins() const { return n / 2 + 1; }
  // Real vectors the signal buffer of rfft/irfft holds (room for the odd-length expansion).
  int64_t signal_elems() const { return even ? n : 2 * n; }
  int64_t work_elems() const { return complex_plan.work_elems(); }
};

// spec[0..n/2] = the transform of the n real vectors in signal (which it clobbers).
template <class T>
void rfft(const RealFftPlan<T>& plan, typename Simd<T>::V* signal, CVec<T>* work, CVec<T>* spec) {
  using V = typename Simd<T>::V;
  const int64_t n = plan.n;
  CVec<T>* z = reinterpret_cast<CVec<T>*>(signal);
  if (!plan.even) {
    for (int64_t t = n - 1; t >= 0; --t) {
      const V x = signal[t];
      z[t] = {x, V{}};
    }
    fft_transform<T, false>(plan.complex_plan, z, work);
    for (int64_t k = 0; k <= n / 2; ++k) spec[k] = z[k];
    return;
  }
  // signal viewed as n/2 complex vectors is z[j] = x[2j] + i x[2j + 1].
  const int64_t h = n / 2;
  fft_transform<T, false>(plan.complex_plan, z, work);
  const V half = vbroadcast<V>(T(0.5));
  for (int64_t k = 0; k <= h / 2; ++k) {
    // Bins k and h - k come from the same pair z[k], z[h - k].
    const int64_t kk = k == 0 ? 0 : h - k;
    const CVec<T> zk = z[k % h], zr = z[kk];
    for (int side = 0; side < (k == 0 || 2 * k == h ? 1 : 2); ++side) {
      const CVec<T> a = side == 0 ? zk : zr, b = side == 0 ? zr : zk;
      const int64_t bin = side == 0 ? k : h - k;
      // E = (a + conj b) / 2, O = (a - conj b) / (2i), X = E + w^bin O
      const CVec<T> e = {(a.re + b.re) * half, (a.im - b.im) * half};
      const CVec<T> o = {(a.im + b.im) * half, (b.re - a.re) * half};
      spec[bin] = cadd(e, cmul_scalar(o, plan.split[2 * bin], plan.split[2 * bin + 1]));
    }
  }
  // Nyquist bin from z[0]: X[h] = Re z0 - Im z0.
  spec[h] = {z[0].re - z[0].im, V{}};
}

// signal[0..n) = the unnormalized inverse (times n) of the half spectrum spec[0..n/2], whose
// imaginary parts at bin 0 and (even n) bin n/2 are ignored, as a real inverse transform does.
// spec is left unchanged.
template <class T>
void irfft(const RealFftPlan<T>& plan, const CVec<T>* spec, typename Simd<T>::V* signal,
           CVec<T>* work) {
  using V = typename Simd<T>::V;
  const int64_t n = plan.n;
  CVec<T>* z = reinterpret_cast<CVec<T>*>(signal);
  if (!plan.even) {
    z[0] = {spec[0].re, V{}};
    for (int64_t k = 1; k <= n / 2; ++k) {
      z[k] = spec[k];
      z[n - k] = {spec[k].re, -spec[k].im};
    }
    fft_transform<T, true>(plan.complex_plan, z, work);
    for (int64_t t = 0; t < n; ++t) signal[t] = z[t].re;  // t <= 2t: reads stay ahead of writes
    return;
  }
  const int64_t h = n / 2;
  for (int64_t k = 0; k < h; ++k) {
    CVec<T> a = spec[k], b = spec[h - k];
    if (k == 0) {
      a.im = V{};
      b.im = V{};
    }
    // E = a + conj b, O = (a - conj b) e^{+2 pi i k / n}, z = E + i O
    const CVec<T> e = {a.re + b.re, a.im - b.im};
    const CVec<T> d = {a.re - b.re, a.im + b.im};
    const CVec<T> o = cmul_scalar(d, plan.split[2 * k], -plan.split[2 * k + 1]);
    z[k] = {e.re - o.im, e.im + o.re};
  }
  fft_transform<T, true>(plan.complex_plan, z, work);
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
