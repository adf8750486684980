// Masking and the online softmax of the CUDA attention engine, on accumulator fragments (a thread
// holds rows lane / 4 and lane / 4 + 8 of its warp's 16, columns 2 (lane % 4) + {0, 1} of every
// 8-column tile). The element rule and the bias come from the policy; full chunks skip the rule,
// and the warp's products skip the key groups of a partial chunk that none of its rows keeps.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/attention_params.h"
#include "tokenmix/cuda/warp_gemm.h"

namespace tokenmix::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kInf = __builtin_huge_valf();

// Sum / max over the 4 lanes that share an accumulator row.
TM_DEVICE float quad_sum(float v) {
  v += shfl_xor_sync(0xffffffffu, v, 1);
  v += shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
TM_DEVICE float quad_max(float v) {
  const float a = shfl_xor_sync(0xffffffffu, v, 1);
  v = v > a ? v : a;
  const float b = shfl_xor_sync(0xffffffffu, v, 2);
  return v > b ? v : b;
}

// Column of accumulator entry (n, i) for this lane (its row is lane / 4 + 8 (i / 2)).
TM_DEVICE int frag_col(int n, int i, int lane) {
  return n * 8 + 2 * (lane & 3) + (i & 1);
}

// A float per column of a kCols-column chunk, held kCols / 32 per lane (column c in lane c % 32)
// and handed to the accumulator layout by shuffles: one shared-memory wavefront per 32 columns,
// where reading each entry's column from shared memory costs one per entry.
template <int kCols>
struct ColumnFloats {
  static_assert(kCols % 32 == 0, "whole warps of columns");
  float v[kCols / 32];

  TM_DEVICE void load(shared_ptr<float> src) {
    const int lane = int(lane_id());
    TM_UNROLL
    for (int r = 0; r < kCols / 32; ++r) v[r] = src[32 * r + lane];
  }
  // The value of column frag_col(n, e, lane), for every lane (a warp-wide shuffle; n is a
  // constant in unrolled loops, so v is indexed statically).
  TM_DEVICE float at(int n, int e) const {
    return shfl_sync(0xffffffffu, v[n / 4], frag_col(n % 4, e, int(lane_id())));
  }
};

// Bit 4n + i of a chunk's element mask covers accumulator entry (n, i) of every lane; the 8 bits
// of fragments 2g and 2g + 1 are columns 16g..16g+15, the chunk's key group g.

// The element mask of a partial chunk, evaluated before its scores are computed: bit 4n + i set
// when the lane's entry (n, i) is kept. keep(ri, j) is the policy's rule for the lane's row ri and
// column j; a row is dropped when `valid[ri]` is false.
template <int KC, class Keep>
TM_DEVICE uint32_t keep_mask(const bool (&valid)[2], Keep&& keep) {
  const int lane = int(lane_id());
  uint32_t kept = 0;
  TM_UNROLL
  for (int n = 0; n < KC; ++n) {
    TM_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int ri = i >> 1;
      kept |= valid[ri] && keep(ri, frag_col(n, i, lane)) ? 1u << (4 * n + i) : 0u;
    }
  }
  return kept;
}

// The key groups of the chunk that some row of the warp keeps (bit g: columns 16g..16g+15), the
// same in every lane. The warp's products skip the other groups: all their entries are masked, so
// their logits are -inf and their P and dS exactly 0 whatever the skipped product would hold.
template <int KC>
TM_DEVICE uint32_t kept_groups(uint32_t kept) {
  static_assert(KC % 2 == 0, "key groups are pairs of 8-column fragments");
  uint32_t groups = 0;
  TM_UNROLL
  for (int g = 0; g < KC / 2; ++g)
    groups |= any_sync(0xffffffffu, ((kept >> (8 * g)) & 0xffu) != 0) ? 1u << g : 0u;
  return groups;
}

// Scores -> logits in log2 units (scaled, biased, masked with -inf); returns the mask: bit 4n + i
// set when s[n][i] is kept. kFull: the chunk keeps every element of the rows whose `valid[ri]` is
// set; otherwise `kept` is the chunk's keep_mask. bias(ri, j) is the policy's bias for the lane's
// row ri and column j.
template <bool kFull, bool kBias, int KC, class Bias>
TM_DEVICE uint32_t mask_scores(float (&s)[KC][4], const bool (&valid)[2], float scale_log2,
                               uint32_t kept, Bias&& bias) {
  const int lane = int(lane_id());
  uint32_t out = 0;
  TM_UNROLL
  for (int n = 0; n < KC; ++n) {
    TM_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int ri = i >> 1, j = frag_col(n, i, lane);
      const bool k = kFull ? valid[ri] : ((kept >> (4 * n + i)) & 1u) != 0;
      float b = 0.0f;
      if constexpr (kBias) {
        if (k) b = bias(ri, j);
      }
      s[n][i] = k ? s[n][i] * scale_log2 + b : kNegInf;
      out |= k ? 1u << (4 * n + i) : 0u;
    }
  }
  return out;
}

// What mask_scores leaves: the element mask (bit 4n + i: s[n][i] kept) and the factor the scores
// still need. The main path leaves the scale to the exponent's FFMA, P = exp2(fma(s, scale,
// -base)); every other path applies it (with the bias and the mask) and leaves 1.
struct MaskedScores {
  uint32_t kept;
  float scale;
};

// The four instantiations of mask_scores behind the chunk's two run-time flags, and the main path
// (a full chunk without bias, both rows of the thread valid): every element kept, and with `fold`
// the scale left to the exponent (32 FMUL per chunk fewer at 64 keys; see kFoldLimit for when
// that is exact enough). fold is the caller's to decide: the forward's running max is taken over
// the unscaled scores and then scaled, which is the max of the scaled ones only for a positive
// finite scale (round(x * c) is monotone in x); the backward's LSEs must be below kFoldLimit.
template <int KC, class Bias>
TM_DEVICE MaskedScores mask_scores(float (&s)[KC][4], const bool (&valid)[2], float scale_log2,
                                   bool full, bool biased, uint32_t kept, Bias&& bias, bool fold) {
  if (full) {
    if (!biased && valid[0] && valid[1]) {
      if (!fold) {
        TM_UNROLL
        for (int n = 0; n < KC; ++n) {
          TM_UNROLL
          for (int i = 0; i < 4; ++i) s[n][i] *= scale_log2;
        }
      }
      return {KC * 4 >= 32 ? ~0u : (1u << (KC * 4)) - 1u, fold ? scale_log2 : 1.0f};
    }
    return {biased ? mask_scores<true, true>(s, valid, scale_log2, kept, bias)
                   : mask_scores<true, false>(s, valid, scale_log2, kept, bias),
            1.0f};
  }
  return {biased ? mask_scores<false, true>(s, valid, scale_log2, kept, bias)
                 : mask_scores<false, false>(s, valid, scale_log2, kept, bias),
          1.0f};
}

// A chunk's element mask and key groups: every group of a full chunk; a partial chunk's from the
// policy's rule (see keep_mask and kept_groups).
struct ChunkMask {
  uint32_t kept = 0, groups = kAllGroups;
};
template <int KC, class Keep>
TM_DEVICE ChunkMask chunk_mask(const bool (&valid)[2], bool full, Keep&& keep) {
  ChunkMask m;
  if (!full) {
    m.kept = keep_mask<KC>(valid, keep);
    m.groups = kept_groups<KC>(m.kept);
  }
  return m;
}

// The normal pass keeps the warp's running maxima while no row's chunk maximum passes its own by
// more than kMaxSlack (log2 units): P then stays at most 2^kMaxSlack (to rounding; in range for
// the fp16/bf16 P of the product), O and l need no rescale, and the LSE (m + log2 l) is the same.
// A warp moves its maxima, and rescales, only when some row of it passes that, so the choice is
// uniform. The test takes the difference mx - m: m + kMaxSlack rounds for |m| >= 2^26 (a tie at
// 2^27 that rounds to m + 16 would let P reach 2^16, inf in fp16).
constexpr float kMaxSlack = 8.0f;

// Leaving the scale c to the exponent, P = exp2(fma(s, c, -m)), shifts every logit of a row by
// the rounding error of its max m = round(max(s) * c), at most half an ulp of m. The softmax does
// not change under a shift (O and the LSE use the same m), so that costs nothing while P stays in
// range: below kFoldLimit = 2^24 the shift is at most 1/2 (P of the max in [2^-1/2, 2^1/2]). Past
// it (a logit of 3e38 shifts by 2^103) the scores are scaled first, as without folding. The
// backward's P = exp2(fma(s, c, -lse)) has no rounded max: fma(s, c, -lse) rounds once, near 0 for
// the keys that matter, which is more accurate than round(s * c) - lse; it folds while every
// live row's LSE is below the limit too, so that an overflowing s * c (whose row's LSE is +inf)
// makes NaN as before.
constexpr float kFoldLimit = 16777216.0f;
// The limit's test, for the forward's chunk maxima and the backward's LSEs (false for inf, NaN).
TM_DEVICE bool within_fold_limit(float x) {
  return fabsf(x) < kFoldLimit;
}
// The backward's rule for a row's LSE (log2 units): within the limit, or -inf (a row without keys:
// its P is 0 anyway).
TM_DEVICE bool foldable(float lse2) {
  return within_fold_limit(lse2) || lse2 == kNegInf;
}

// P = exp2(s * scale - base) in place (one FFMA), summed into l[ri] (P < 2^-126 counts as 0).
template <int KC>
TM_DEVICE void exponentiate_row(float (&s)[KC][4], int ri, float scale, float base, float& l) {
  float sum = 0.0f;
  TM_UNROLL
  for (int n = 0; n < KC; ++n) {
    TM_UNROLL
    for (int e = 0; e < 2; ++e) {
      const float pe = exp2f_ftz(fma_rn(s[n][2 * ri + e], scale, -base));
      s[n][2 * ri + e] = pe;
      sum += pe;
    }
  }
  l += sum;
}

// One chunk of the online softmax for the two rows of a thread: s holds logits (log2 units) divided
// by `scale` (mask_scores' MaskedScores::scale: 1, or positive and finite, see kFoldLimit) and
// becomes P relative to the running max m (log2 units); l (this thread's partial row sums) and the
// output accumulator o are rescaled when m moves. kExact: record NaN logits (the exact pass, for
// the LSE), and move m on every chunk.
template <bool kExact, int KC, int NV>
TM_DEVICE void online_softmax_update(float (&s)[KC][4], float (&o)[NV][4], float (&m)[2],
                                     float (&l)[2], bool (&nan_logit)[2], float scale) {
  float mx[2];
  TM_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    mx[ri] = kNegInf;
    TM_UNROLL
    for (int n = 0; n < KC; ++n) {
      if constexpr (kExact) {
        mx[ri] = mx[ri] > s[n][2 * ri] ? mx[ri] : s[n][2 * ri];
        mx[ri] = mx[ri] > s[n][2 * ri + 1] ? mx[ri] : s[n][2 * ri + 1];
        nan_logit[ri] |= s[n][2 * ri] != s[n][2 * ri] || s[n][2 * ri + 1] != s[n][2 * ri + 1];
      } else {
        // FMNMX, which skips NaN: a NaN logit still makes its P, the row sum and O NaN, and a
        // non-finite O sends the block to the exact pass, which takes the max above.
        mx[ri] = fmaxf(mx[ri], fmaxf(s[n][2 * ri], s[n][2 * ri + 1]));
      }
    }
    mx[ri] = quad_max(mx[ri]) * scale;
  }
  if constexpr (!kExact) {
    // (m = -inf: any logit above -inf moves it (+inf > slack); m = +inf: nothing passes it
    // (-inf or NaN); a NaN mx moves nothing, its P is NaN and sends the block to the exact pass.)
    const bool passes = mx[0] - m[0] > kMaxSlack || mx[1] - m[1] > kMaxSlack;
    // A max at or past kFoldLimit (or -inf, or NaN): scale first (a no-op when nothing was left
    // to the exponent; testing for that would cost the main path a branch). A running max m past
    // the limit needs no test: the keys near it have an mx past it too, and for the others
    // fma(s, c, -m) is far below 0, its rounding relative to that.
    const bool wide = !(within_fold_limit(mx[0]) && within_fold_limit(mx[1]));
    if (!any_sync(0xffffffffu, passes || wide)) {
      TM_UNROLL
      for (int ri = 0; ri < 2; ++ri)
        exponentiate_row(s, ri, scale, m[ri] == kNegInf ? 0.0f : m[ri], l[ri]);
      return;
    }
    if (wide) {  // (the quad's rows share mx, so its four lanes agree)
      TM_UNROLL
      for (int n = 0; n < KC; ++n) {
        TM_UNROLL
        for (int i = 0; i < 4; ++i) s[n][i] *= scale;
      }
      scale = 1.0f;
    }
  }
  TM_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    const float m_new = m[ri] > mx[ri] ? m[ri] : mx[ri];
    const float base = m_new == kNegInf ? 0.0f : m_new;  // a row with nothing seen yet
    const float alpha = exp2f_ftz(m[ri] - base);
    m[ri] = m_new;
    l[ri] *= alpha;
    exponentiate_row(s, ri, scale, base, l[ri]);
    TM_UNROLL
    for (int n = 0; n < NV; ++n) {
      o[n][2 * ri] *= alpha;
      o[n][2 * ri + 1] *= alpha;
    }
  }
}

// The two instantiations behind the pass: a run-time test inside one body lets nvcc if-convert the
// NaN checks into the normal pass's main path (89 more instructions per chunk at D=64).
template <int KC, int NV>
TM_DEVICE void online_softmax_step(float (&s)[KC][4], float (&o)[NV][4], float (&m)[2],
                                   float (&l)[2], bool (&nan_logit)[2], bool exact, float scale) {
  if (exact)
    online_softmax_update<true>(s, o, m, l, nan_logit, scale);
  else
    online_softmax_update<false>(s, o, m, l, nan_logit, scale);
}

// The LSE (natural log) of a finished row, as torch.logsumexp: NaN with a NaN logit, +inf with a
// +inf logit, -inf when no key was kept.
TM_DEVICE float row_lse(float m, float total, bool nan_row) {
  return nan_row         ? __builtin_nanf("")
         : m == kInf     ? kInf
         : total == 0.0f ? kNegInf
                         : (m + log2f_approx(total)) * kLn2;
}

}  // namespace tokenmix::cuda
