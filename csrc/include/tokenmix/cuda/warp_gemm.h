// Element types and the two warp-level matrix products of the CUDA attention engine, as policies.
//
// Every product leaves its result in the register layout of the m16n8k16 accumulator (a warp owns
// 16 rows; see simt/layouts.h), so masking, softmax and stores are written once for all types:
//   gemm_nt: acc[n] += A[16 x K] * B[8n..8n+7, 0..K)^T, A and B row major in shared memory
//            (scores Q K^T, dP = dO V^T, and their transposes in the key-major backward);
//   gemm_pn: acc[n] += P[16 x 8*KC] * B[0..8*KC, 8n..8n+7], P held in accumulator fragments,
//            B row major in shared memory (O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q);
//   gemm_pn_exact: the same product over the entries a mask keeps, in fp32 FMAs, for the B tiles
//            that hold a non-finite value (a masked P entry is 0, and 0 * inf is NaN).
// fp16/bf16 use tensor cores (ldmatrix + mma.sync, fp32 accumulation); fp32 uses FMAs with the
// same fragment ownership, staging P through a per-warp shared buffer.
//
// gemm_nt and gemm_pn take the chunk's key groups (bit g: columns 16g..16g+15 of the scores, the
// k range 16g..16g+15 of gemm_pn; the same in every lane) and skip the others: those columns of
// the scores are left as they were, and gemm_pn adds nothing for them.
#pragma once

#include <cstdint>

#include "tokenmix/simt/simt.h"

namespace tokenmix::cuda {

using namespace ::tokenmix::simt;

// Every key group of a chunk (see gemm_nt).
constexpr uint32_t kAllGroups = 0xffffffffu;

TM_DEVICE bool has_group(uint32_t groups, int g) {
  return ((groups >> g) & 1u) != 0;
}

// fp16 and bf16: 16-bit storage, tensor cores. F16 and BF16 are distinct types (not aliases) so
// that kernel names in ptxas reports and profiles say which one they are.
template <bool kBF16>
struct Half16 {
  using T = uint16_t;
  static constexpr bool kTensorCore = true;
  static constexpr bool kIsBF16 = kBF16;
  static constexpr int kKeys = 64;  // keys per chunk
  static constexpr int kStep = 16;  // head dims are padded to this
  static TM_DEVICE float to_float(T v) { return kBF16 ? bf16_bits_to_f32(v) : f16_bits_to_f32(v); }
  static TM_DEVICE T from_float(float f) {
    return kBF16 ? f32_to_bf16_bits(f) : f32_to_f16_bits(f);
  }
  static TM_DEVICE uint32_t pack(float lo, float hi) {
    return pack_b16x2(from_float(lo), from_float(hi));
  }
  // Exponent field of both halves of a 32-bit word, and one unit of it (see any_nonfinite).
  static constexpr uint32_t kExpMask = kBF16 ? 0x7f807f80u : 0x7c007c00u;
  static constexpr uint32_t kExpOne = kBF16 ? 0x00800080u : 0x04000400u;
  static TM_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (kBF16)
      mma_m16n8k16_bf16f32(d, a, b, d);
    else
      mma_m16n8k16_f16f32(d, a, b, d);
  }
};
struct F16 : Half16<false> {};
struct BF16 : Half16<true> {};

// fp32 keeps full precision (no tf32): FMAs, and half the keys per chunk so that a 256-wide head
// still fits the shared memory of sm_80.
struct F32 {
  using T = float;
  static constexpr bool kTensorCore = false;
  static constexpr int kKeys = 32;
  static constexpr int kStep = 8;
  static TM_DEVICE float to_float(T v) { return v; }
  static TM_DEVICE T from_float(float f) { return f; }
  static constexpr uint32_t kExpMask = 0x7f800000u;
  static constexpr uint32_t kExpOne = 0x00800000u;
};

// Whether a 16-byte vector of E::T holds an inf or NaN: an element is non-finite when its exponent
// field is all ones, and adding one unit to the masked field carries into the bit above it only
// then (the sign bit of that element, which the mask cleared).
template <class E>
TM_HOST_DEVICE bool any_nonfinite(u32x4 v) {
  constexpr uint32_t top = E::kExpMask + E::kExpOne;  // the carry bits: 0x80000000 or 0x80008000
  const uint32_t t = ((v.x & E::kExpMask) + E::kExpOne) | ((v.y & E::kExpMask) + E::kExpOne) |
                     ((v.z & E::kExpMask) + E::kExpOne) | ((v.w & E::kExpMask) + E::kExpOne);
  return (t & top) != 0;
}

// Elements per 16-byte copy.
template <class T>
constexpr int kVec = 16 / int(sizeof(T));

// Where element (r, c) of a shared tile lies, in elements from the tile's start. The mma.sync
// products read rows padded to `ld` elements (an int); the wgmma products read SwizzledRows.
TM_HOST_DEVICE int tile_offset(int ld, int r, int c) {
  return r * ld + c;
}
// The canonical 128-byte-swizzled layout of wgmma (16-bit elements): 64-column atoms of `rows`
// rows of 128 bytes each, atom after atom; in a row, 16-byte unit u holds columns 8(u ^ (r % 8))..
// The tile starts on a 1024-byte boundary (the swizzle's period). Read as K-major (A and B of
// Q K^T) and as MN-major (V of P V) by the same descriptors (warpgroup_gemm.h).
struct SwizzledRows {
  int rows;
};
TM_HOST_DEVICE int tile_offset(SwizzledRows s, int r, int c) {
  return (c >> 6) * s.rows * 64 + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
}

// Row stride (elements) of a shared tile `width` wide: 16 bytes of padding keep rows 16-byte
// aligned for cp.async/ldmatrix and spread consecutive rows over the banks.
template <class T>
TM_HOST_DEVICE int padded_ld(int width) {
  return width + kVec<T>;
}

// Floats of the per-warp staging buffer of gemm_pn (FMA path only).
template <class E>
TM_HOST_DEVICE int stage_floats(int cols) {
  return E::kTensorCore ? 0 : 16 * (cols + 1);
}

template <int N>
TM_DEVICE void zero_acc(float (&acc)[N][4]) {
  TM_UNROLL
  for (int n = 0; n < N; ++n) {
    TM_UNROLL
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
  }
}

// One 16-deep k-step of the tensor-core products, A (16 x 16) given as its fragments af (`lane`:
// the caller's lane_id(), read once per product; reading it per k-step changed nvcc's unrolling
// and scheduling of the callers' loops, up to 52 more instructions per chunk):
//   nt: acc[n] += A * B[8n..8n+7, ks..ks+15]^T (B row major: gemm_nt's keys or queries);
//   pn: acc[n] += A * B[16kk..16kk+15, 8n..8n+7] (B row major: gemm_pn's values or rows).
// kSkip (nt): test `groups` per pair of 8-column tiles (else every tile, and no test).
template <class E, bool kSkip, int N>
TM_DEVICE void mma_nt_kstep(float (&acc)[N][4], const uint32_t (&af)[4],
                            shared_ptr<typename E::T> b, int ldb, int ks, uint32_t groups,
                            int lane) {
  static_assert(N % 2 == 0, "tensor-core gemm_nt takes pairs of 8-column tiles");
  TM_UNROLL
  for (int n = 0; n < N; n += 2) {
    if (kSkip && !has_group(groups, n >> 1)) continue;
    uint32_t r[4];
    ldmatrix_x4(r,
                b + (n * 8 + (lane & 7) + ((lane >> 4) << 3)) * ldb + ks + ((lane >> 3) & 1) * 8);
    const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
    E::mma(acc[n], af, b0);
    E::mma(acc[n + 1], af, b1);
  }
}
template <class E, int N>
TM_DEVICE void mma_pn_kstep(float (&acc)[N][4], const uint32_t (&af)[4],
                            shared_ptr<typename E::T> b, int ldb, int kk, int lane) {
  static_assert(N % 2 == 0, "tensor-core gemm_pn takes pairs of 8-column tiles");
  TM_UNROLL
  for (int n = 0; n < N; n += 2) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, b + (kk * 16 + (lane & 15)) * ldb + n * 8 + (lane >> 4) * 8);
    const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
    E::mma(acc[n], af, b0);
    E::mma(acc[n + 1], af, b1);
  }
}

// The A fragments of k-step kk of a product whose A is P (accumulator fragments): the
// fragments of columns 16kk..16kk+15 are the A fragment of k-step kk, packed to 16 bits.
template <class E, int KC>
TM_DEVICE void pack_a_fragment(uint32_t (&af)[4], const float (&p)[KC][4], int kk) {
  af[0] = E::pack(p[2 * kk][0], p[2 * kk][1]);
  af[1] = E::pack(p[2 * kk][2], p[2 * kk][3]);
  af[2] = E::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
  af[3] = E::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
}

// The A fragments of 16 row-major rows of shared memory, 16 * KS columns (tensor cores), for a
// warp that multiplies the same rows at every step and keeps them in registers.
template <class E, int KS>
TM_DEVICE void load_a_fragments(uint32_t (&af)[KS][4], shared_ptr<typename E::T> a, int lda) {
  const int lane = int(lane_id());
  TM_UNROLL
  for (int ks = 0; ks < KS; ++ks)
    ldmatrix_x4(af[ks], a + (lane & 15) * lda + ks * 16 + (lane >> 4) * 8);
}

// kSkip: test `groups` (else every group is computed and the loops carry no test).
template <class E, bool kSkip, int N>
TM_DEVICE void gemm_nt_groups(float (&acc)[N][4], shared_ptr<typename E::T> a, int lda,
                              shared_ptr<typename E::T> b, int ldb, int k, uint32_t groups) {
  const int lane = int(lane_id());
  if constexpr (E::kTensorCore) {
    for (int ks = 0; ks < k; ks += 16) {
      uint32_t af[4];
      ldmatrix_x4(af, a + (lane & 15) * lda + ks + (lane >> 4) * 8);
      mma_nt_kstep<E, kSkip>(acc, af, b, ldb, ks, groups, lane);
    }
  } else {
    const int g = lane >> 2, c2 = 2 * (lane & 3);
    for (int kk = 0; kk < k; ++kk) {
      const float a0 = a[g * lda + kk], a1 = a[(g + 8) * lda + kk];
      TM_UNROLL
      for (int n = 0; n < N; ++n) {
        if (kSkip && !has_group(groups, n >> 1)) continue;
        const float b0 = b[(n * 8 + c2) * ldb + kk], b1 = b[(n * 8 + c2 + 1) * ldb + kk];
        acc[n][0] += a0 * b0;
        acc[n][1] += a0 * b1;
        acc[n][2] += a1 * b0;
        acc[n][3] += a1 * b1;
      }
    }
  }
}

template <class E, bool kSkip, int KC, int N>
TM_DEVICE void gemm_pn_groups(float (&acc)[N][4], const float (&p)[KC][4],
                              shared_ptr<typename E::T> b, int ldb, shared_ptr<float> stage,
                              uint32_t groups) {
  const int lane = int(lane_id());
  if constexpr (E::kTensorCore) {
    static_assert(KC % 2 == 0, "tensor-core gemm_pn takes pairs of tiles");
    TM_UNROLL
    for (int kk = 0; kk < KC / 2; ++kk) {
      if (kSkip && !has_group(groups, kk)) continue;
      uint32_t af[4];
      pack_a_fragment<E>(af, p, kk);
      mma_pn_kstep<E>(acc, af, b, ldb, kk, lane);
    }
  } else {
    const int g = lane >> 2, c2 = 2 * (lane & 3);
    constexpr int lds = KC * 8 + 1;
    TM_UNROLL
    for (int n = 0; n < KC; ++n) {
      stage[g * lds + n * 8 + c2] = p[n][0];
      stage[g * lds + n * 8 + c2 + 1] = p[n][1];
      stage[(g + 8) * lds + n * 8 + c2] = p[n][2];
      stage[(g + 8) * lds + n * 8 + c2 + 1] = p[n][3];
    }
    sync_warp();
    for (int j = 0; j < KC * 8; ++j) {
      if (kSkip && !has_group(groups, j >> 4)) continue;
      const float p0 = stage[g * lds + j], p1 = stage[(g + 8) * lds + j];
      TM_UNROLL
      for (int n = 0; n < N; ++n) {
        const float b0 = b[j * ldb + n * 8 + c2], b1 = b[j * ldb + n * 8 + c2 + 1];
        acc[n][0] += p0 * b0;
        acc[n][1] += p0 * b1;
        acc[n][2] += p1 * b0;
        acc[n][3] += p1 * b1;
      }
    }
    sync_warp();  // the next gemm_pn overwrites the stage
  }
}

// The products as the engine calls them: a chunk with every key group (every full chunk) runs the
// loops without the group tests, which would otherwise cost its main path issue slots.
template <class E, int N>
TM_DEVICE void gemm_nt(float (&acc)[N][4], shared_ptr<typename E::T> a, int lda,
                       shared_ptr<typename E::T> b, int ldb, int k, uint32_t groups = kAllGroups) {
  if (groups == kAllGroups)
    gemm_nt_groups<E, false>(acc, a, lda, b, ldb, k, groups);
  else
    gemm_nt_groups<E, true>(acc, a, lda, b, ldb, k, groups);
}
template <class E, int KC, int N>
TM_DEVICE void gemm_pn(float (&acc)[N][4], const float (&p)[KC][4], shared_ptr<typename E::T> b,
                       int ldb, shared_ptr<float> stage, uint32_t groups = kAllGroups) {
  if (groups == kAllGroups)
    gemm_pn_groups<E, false>(acc, p, b, ldb, stage, groups);
  else
    gemm_pn_groups<E, true>(acc, p, b, ldb, stage, groups);
}

// The tensor-core products with A held in registers as packed fragments (load_a_fragments,
// pack_a_fragment), for the D=128 key-major kernel (attention_dkdv_pairs.h):
//   gemm_nt_held: acc[n] += A[16 x 16KS] * B[8n..8n+7, 0..16KS)^T;
//   gemm_an:      acc[n] += A[16 x 16KS] * B[0..16KS, 8n..8n+7].
// `groups` as for gemm_nt (bit g: B rows 16g..16g+15 of gemm_nt, k-step g of gemm_an).
template <class E, bool kSkip, int KS, int N>
TM_DEVICE void gemm_nt_held_groups(float (&acc)[N][4], const uint32_t (&af)[KS][4],
                                   shared_ptr<typename E::T> b, int ldb, uint32_t groups) {
  const int lane = int(lane_id());
  TM_UNROLL
  for (int ks = 0; ks < KS; ++ks)
    mma_nt_kstep<E, kSkip>(acc, af[ks], b, ldb, ks * 16, groups, lane);
}
template <class E, bool kSkip, int KS, int N>
TM_DEVICE void gemm_an_groups(float (&acc)[N][4], const uint32_t (&af)[KS][4],
                              shared_ptr<typename E::T> b, int ldb, uint32_t groups) {
  const int lane = int(lane_id());
  TM_UNROLL
  for (int kk = 0; kk < KS; ++kk) {
    if (kSkip && !has_group(groups, kk)) continue;
    mma_pn_kstep<E>(acc, af[kk], b, ldb, kk, lane);
  }
}
template <class E, int KS, int N>
TM_DEVICE void gemm_nt_held(float (&acc)[N][4], const uint32_t (&af)[KS][4],
                            shared_ptr<typename E::T> b, int ldb, uint32_t groups) {
  static_assert(E::kTensorCore, "held fragments are tensor-core operands");
  if (groups == kAllGroups)
    gemm_nt_held_groups<E, false>(acc, af, b, ldb, groups);
  else
    gemm_nt_held_groups<E, true>(acc, af, b, ldb, groups);
}
template <class E, int KS, int N>
TM_DEVICE void gemm_an(float (&acc)[N][4], const uint32_t (&af)[KS][4], shared_ptr<typename E::T> b,
                       int ldb, uint32_t groups) {
  static_assert(E::kTensorCore, "held fragments are tensor-core operands");
  if (groups == kAllGroups)
    gemm_an_groups<E, false>(acc, af, b, ldb, groups);
  else
    gemm_an_groups<E, true>(acc, af, b, ldb, groups);
}

// Part h of gemm_nt's result split into kParts column parts: part[n] = A B[8(h*N + n) + 0..7]^T,
// N = KC / kParts, in a fresh accumulator; the part's key groups are bits h*N/2.. of `groups` (a
// full chunk's kAllGroups stays kAllGroups, so the part's loops carry no group tests either). The
// dQ kernel computes dP this way, a part at a time in an unrolled loop over h, beside 128-column
// accumulators: a 16 x 64 product held whole would not fit the registers. Each part reloads the A
// fragments; every entry keeps its order of accumulation.
template <class E, int KC, int kParts, int N>
TM_DEVICE void gemm_nt_part(float (&part)[N][4], int h, shared_ptr<typename E::T> a, int lda,
                            shared_ptr<typename E::T> b, int ldb, int k, uint32_t groups) {
  static_assert(N * kParts == KC && (kParts == 1 || N % 2 == 0), "parts of whole key groups");
  zero_acc(part);
  const uint32_t g = groups == kAllGroups ? groups : groups >> (h * N / 2);
  gemm_nt<E>(part, a, lda, b + h * N * 8 * ldb, ldb, k, g);
}

// acc[n] += P[16 x 8*KC] * B[0..8*KC, 8n..8n+7] over the entries whose bit is set in `keep`
// (bit 4n + i of a lane covers p[n][i], the accumulator layout), in fp32 FMAs: an entry outside
// the mask adds exactly nothing, even where B is inf or NaN. For the chunks whose B tile holds a
// non-finite value; the masked-out P entries are 0, and gemm_pn would add 0 * inf = NaN. Column j
// of a lane's two rows lives in lane (lane & ~3) | (j & 7) / 2 of its quad, fragment j / 8.
template <class E, int KC, int N, class Lay>
TM_DEVICE void gemm_pn_exact(float (&acc)[N][4], const float (&p)[KC][4], uint32_t keep,
                             shared_ptr<typename E::T> b, Lay ldb) {
  const int lane = int(lane_id());
  const int c2 = 2 * (lane & 3);
  for (int j = 0; j < KC * 8; ++j) {
    const int nj = j >> 3, e = j & 1, src = (lane & ~3) | ((j & 7) >> 1);
    float p0 = 0.0f, p1 = 0.0f;
    TM_UNROLL
    for (int n = 0; n < KC; ++n) {
      if (n == nj) {
        p0 = e ? p[n][1] : p[n][0];
        p1 = e ? p[n][3] : p[n][2];
      }
    }
    p0 = shfl_sync(0xffffffffu, p0, src);
    p1 = shfl_sync(0xffffffffu, p1, src);
    const uint32_t kb = shfl_sync(0xffffffffu, keep, src);
    const bool k0 = ((kb >> (4 * nj + e)) & 1u) != 0, k1 = ((kb >> (4 * nj + 2 + e)) & 1u) != 0;
    TM_UNROLL
    for (int n = 0; n < N; ++n) {
      TM_UNROLL
      for (int f = 0; f < 2; ++f) {
        const float x = E::to_float(b[tile_offset(ldb, j, n * 8 + c2 + f)]);
        if (k0) acc[n][f] += p0 * x;
        if (k1) acc[n][2 + f] += p1 * x;
      }
    }
  }
}

}  // namespace tokenmix::cuda
