// Shared-memory plans of the CUDA attention engine. The kernels carve their dynamic shared memory
// with these functions and the host sizes the launch with the very same ones.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/attention_params.h"
#include "tokenmix/cuda/warp_gemm.h"

namespace tokenmix::cuda {

struct SmemPlan {
  int64_t bytes = 0;
  TM_HOST_DEVICE int64_t take(int64_t n, int64_t align = 16) {
    const int64_t off = (bytes + align - 1) / align * align;
    bytes = off + n;
    return off;
  }
};

// The sm_90a path's tiles (SwizzledRows) start on 1024-byte boundaries of the shared window; the
// kernels move their dynamic shared memory up to the next one, so the plans reserve that much.
constexpr int64_t kSwizzleAlign = 1024;

// Query-major kernels (forward, backward_dq): a tile of kTileRows queries, chunks of E::kKeys keys.
// rows / keys: the policy's metadata of the query rows and of the current key chunk (ints);
// rowf: the engine's per-row lse2 and delta (backward).
struct QueryMajorSmem {
  int ldq, ldv;  // row strides of the D- and Dv-wide tiles
  int64_t q, go, k, v, rows, rowf, keys, stage, ds, votes;  // byte offsets
  int64_t bytes;
};

// vwidth: value columns held per row (the forward's value chunk; the backward's full Dv).
// bias_stage: the dQ kernel stages dS for a deterministic bias gradient (neighborhood rpb).
// swizzled: the sm_90a path's Q, K and V tiles (SwizzledRows: 64-column atoms, 1024-aligned;
// ldq / ldv are then the tiles' widths, multiples of 64), else rows padded to ldq / ldv.
template <class E>
TM_HOST_DEVICE QueryMajorSmem query_major_smem(int dp, int vwidth, bool backward, bool bias_stage,
                                               int row_ints, int key_ints, bool swizzled = false) {
  using T = typename E::T;
  QueryMajorSmem s{};
  SmemPlan plan;
  s.ldq = swizzled ? (dp + 63) / 64 * 64 : padded_ld<T>(dp);
  s.ldv = swizzled ? (vwidth + 63) / 64 * 64 : padded_ld<T>(vwidth);
  const int64_t align = swizzled ? kSwizzleAlign : 16;
  s.q = plan.take(int64_t(kTileRows) * s.ldq * sizeof(T), align);
  s.go = backward ? plan.take(int64_t(kTileRows) * s.ldv * sizeof(T), align) : 0;
  s.k = plan.take(int64_t(E::kKeys) * s.ldq * sizeof(T), align);
  s.v = plan.take(int64_t(E::kKeys) * s.ldv * sizeof(T), align);
  s.rows = plan.take(int64_t(row_ints) * 4);
  s.rowf = plan.take(int64_t(kTileRows) * 2 * 4);  // lse2, delta
  s.keys = plan.take(int64_t(key_ints) * 4);
  s.stage = plan.take(int64_t(kWarps) * stage_floats<E>(E::kKeys) * 4);
  s.ds = bias_stage ? plan.take(int64_t(kTileRows) * (E::kKeys + 1) * 4) : 0;
  s.votes = plan.take(int64_t(2 * kWarps) * 4);  // block_any words: chunk tiles, end of pass
  s.bytes = plan.bytes + (swizzled ? kSwizzleAlign : 0);
  return s;
}

// The kernel's dynamic shared memory, moved up to a kSwizzleAlign boundary of the shared window
// on the sm_90a path.
template <bool kSwizzled>
TM_DEVICE shared_ptr<unsigned char> plan_base() {
  const shared_ptr<unsigned char> smem = dynamic_shared<unsigned char>();
  if constexpr (!kSwizzled) return smem;
  const uint32_t at = shared_window_address(smem);
  return smem +
         ((uint32_t(kSwizzleAlign) - at % uint32_t(kSwizzleAlign)) % uint32_t(kSwizzleAlign));
}

// Key-major kernel (backward_dkdv): a tile of kTileRows keys, chunks of E::kKeys queries.
// rows / cols: the policy's metadata of the key rows and of the current query chunk (ints);
// colf: the engine's per-column lse2, delta and validity; exchange: the two-warps-per-16-keys
// kernel's P^T and dS^T halves (attention_dkdv_pairs.h), `warps` being the block's warps.
struct KeyMajorSmem {
  int ldq, ldv;
  int64_t k, v, q, go, rows, cols, colf, stage, exchange, votes;
  int64_t bytes;
};

// Bytes per warp of that exchange: the A fragments (16 bytes per lane and 16-query k-step) of a
// warp's 32 query columns of P^T and of dS^T, and its element-mask word per lane.
template <class E>
constexpr int kPairExchangeBytes = 2 * (E::kKeys / 2 / 16) * 32 * 16 + 32 * 4;

template <class E>
TM_HOST_DEVICE KeyMajorSmem key_major_smem(int dp, int dvp, int row_ints, int col_ints,
                                           int warps = kWarps) {
  using T = typename E::T;
  KeyMajorSmem s{};
  SmemPlan plan;
  s.ldq = padded_ld<T>(dp);
  s.ldv = padded_ld<T>(dvp);
  s.k = plan.take(int64_t(kTileRows) * s.ldq * sizeof(T));
  s.v = plan.take(int64_t(kTileRows) * s.ldv * sizeof(T));
  s.q = plan.take(int64_t(E::kKeys) * s.ldq * sizeof(T));
  s.go = plan.take(int64_t(E::kKeys) * s.ldv * sizeof(T));
  s.rows = plan.take(int64_t(row_ints) * 4);
  s.cols = plan.take(int64_t(col_ints) * 4);
  s.colf = plan.take(int64_t(E::kKeys) * 3 * 4);  // lse2, delta, valid
  s.stage = plan.take(int64_t(kWarps) * stage_floats<E>(E::kKeys) * 4);
  s.exchange = warps > kWarps ? plan.take(int64_t(warps) * kPairExchangeBytes<E>) : 0;
  s.votes = plan.take(int64_t(3 * warps) * 4);  // block_any words: Q, dO, end of pass
  s.bytes = plan.bytes;
  return s;
}

TM_HOST_DEVICE int round_up_to(int x, int m) {
  return (x + m - 1) / m * m;
}

// Output columns per backward block (grid.y covers the rest), kGradChunk for the general path:
//   dQ: the whole head for the specialized head dims, so one block computes S and dP once;
//   dK/dV: the whole head too. At D=128 (fp16/bf16 only) a warp holding 128 columns of both dK
//   and dV (128 floats per thread) has no registers left for its products, so the block has
//   two warps per 16 keys, each with 64 of the columns (dkdv_warps; attention_dkdv_pairs.h).
template <int kDim>
constexpr int dq_chunk = kDim > 0 ? kDim : kGradChunk;
template <int kDim>
constexpr int dkdv_chunk = kDim > 0 ? kDim : kGradChunk;
template <int kDim>
constexpr int dkdv_warps = kDim == 2 * kGradChunk ? 2 * kWarps : kWarps;

// Width of the shared Q/K/V/dO tiles of the backward kernels: the column chunks of dQ, dK and dV
// read whole chunks, so the general path pads both head dims to a multiple of kGradChunk.
template <int kDim>
TM_HOST_DEVICE int grad_tile_width(const AttentionParams& p) {
  const int widest = p.head_dim > p.value_dim ? p.head_dim : p.value_dim;
  return kDim > 0 ? kDim : round_up_to(widest, kGradChunk);
}

}  // namespace tokenmix::cuda
