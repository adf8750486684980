// The products of the attention engine's sm_90a path: wgmma over the block's four warps (one
// warpgroup, kTileRows = 64 rows), operands in SwizzledRows tiles (warp_gemm.h), accumulators in
// the same fragments as the mma.sync products (a wgmma m64nNk16 accumulator is, per warp, the
// m16n8 C fragments of its 16 rows), so the masking and the online softmax are shared.
//   wg_scores:  S (64 x 64) = Q K^T, both operands K-major from shared memory.
//   wg_values:  O (64 x Dv) += P V, P from registers (the A fragments of the accumulators), V
//               MN-major from shared memory.
// Each issues its wgmmas as one group and waits for it, so the accumulators are final on return.
#pragma once

#include <cstdint>

#include "tokenmix/cuda/warp_gemm.h"

namespace tokenmix::cuda {

// Descriptor of a SwizzledRows tile read as a K-major operand (rows x 16 columns from column 0):
// 128-byte rows, 8-row groups 1024 bytes apart (the leading offset is unused).
template <class T>
TM_DEVICE uint64_t wg_k_major(shared_ptr<T> tile) {
  return wgmma_descriptor(tile, 16, 1024, layout::wgmma_swizzle::b128);
}
// Descriptor of a SwizzledRows tile read as an MN-major operand (16 rows from row 0, the columns as
// N): 64-column atoms `rows * 128` bytes apart, 8-row groups 1024 bytes apart.
template <class T>
TM_DEVICE uint64_t wg_mn_major(shared_ptr<T> tile, int rows) {
  return wgmma_descriptor(tile, uint32_t(rows) * 128, 1024, layout::wgmma_swizzle::b128);
}
// A descriptor moved on by `bytes` (a multiple of 16, within the shared window): the start
// address field (bits 0-13) counts 16-byte units.
TM_HOST_DEVICE uint64_t wg_advance(uint64_t desc, int bytes) {
  return desc + uint64_t(bytes >> 4);
}

// The descriptors of the forward's three tiles, made once per block.
struct WgTiles {
  uint64_t q, k, v;
};
template <class T>
TM_DEVICE WgTiles wg_tiles(shared_ptr<T> q, shared_ptr<T> k, shared_ptr<T> v, int v_rows) {
  return {wg_k_major(q), wg_k_major(k), wg_mn_major(v, v_rows)};
}

// S = Q K^T over kDim head dims: k-step kk reads columns 16kk.., 32 bytes into a 128-byte row,
// in the atom kk / 4 (atoms `rows * 128` bytes apart; Q and K both have kTileRows = 64 rows).
template <class E, int kDim, int KC>
TM_DEVICE void wg_scores(float (&s)[KC][4], const WgTiles& t) {
  static_assert(KC * 8 == 64 && E::kKeys == kTileRows, "a score chunk is 64 keys, like a Q tile");
  float (&d)[KC * 4] = reinterpret_cast<float (&)[KC * 4]>(s);
  wgmma_fence();
  TM_UNROLL
  for (int kk = 0; kk < kDim / 16; ++kk) {
    const int step = (kk >> 2) * kTileRows * 128 + (kk & 3) * 32;
    wgmma_ss<KC * 8, E::kIsBF16, false, false>(d, wg_advance(t.q, step), wg_advance(t.k, step),
                                               kk > 0);
  }
  wgmma_commit_group();
  wgmma_wait_group<0>(s);
}

// O += P V: k-step kk reads keys 16kk.. of V (16 rows of 128 bytes).
template <class E, int KC, int NV>
TM_DEVICE void wg_values(float (&o)[NV][4], const float (&p)[KC][4], const WgTiles& t) {
  static_assert(KC % 2 == 0, "P is consumed 16 keys at a time");
  float (&d)[NV * 4] = reinterpret_cast<float (&)[NV * 4]>(o);
  // The A fragments of all k-steps stay unchanged until the wait (wgmma reads them asynchronously).
  uint32_t af[KC / 2][4];
  TM_UNROLL
  for (int kk = 0; kk < KC / 2; ++kk) {
    af[kk][0] = E::pack(p[2 * kk][0], p[2 * kk][1]);
    af[kk][1] = E::pack(p[2 * kk][2], p[2 * kk][3]);
    af[kk][2] = E::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    af[kk][3] = E::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
  }
  wgmma_fence();
  TM_UNROLL
  for (int kk = 0; kk < KC / 2; ++kk)
    wgmma_rs<NV * 8, E::kIsBF16, true>(d, af[kk], wg_advance(t.v, kk * 16 * 128), true);
  wgmma_commit_group();
  wgmma_wait_group<0>(o);
}

}  // namespace tokenmix::cuda
