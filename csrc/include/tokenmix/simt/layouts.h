// Register fragment layouts of the warp-level matrix instructions, as the PTX ISA defines them.
// The emulator executes mma/ldmatrix through these tables; kernels use them to address fragments.
//
// With groupID = lane >> 2 and threadID_in_group = lane % 4 (PTX ISA, "Matrix fragments for
// mma.m16n8k16 with floating point type", .f16/.bf16):
//   A (16x16, row major): element i = 0..7 lives in register i/2, half i%2 (half 0 = bits 0-15)
//     row = groupID + 8 * ((i / 2) % 2), col = 2 * threadID_in_group + (i % 2) + 8 * (i / 4)
//   B (16x8, K x N):      element i = 0..3 lives in register i/2, half i%2
//     row (k) = 2 * threadID_in_group + (i % 2) + 8 * (i / 2), col (n) = groupID
//   C, D (16x8, f32):     element i = 0..3 is register i
//     row = groupID + 8 * (i / 2), col = 2 * threadID_in_group + (i % 2)
// mma.m16n8k8 with .tf32 operands (PTX ISA, "Matrix fragments for mma.m16n8k8", .tf32): one
// 32-bit element per register.
//   A (16x8): element i = 0..3: row = groupID + 8 * (i % 2), col = threadID_in_group + 4 * (i / 2)
//   B (8x8):  element i = 0..1: row (k) = threadID_in_group + 4 * i, col (n) = groupID
//   C, D: as for m16n8k16
// ldmatrix.m8n8.b16 (PTX ISA, "ldmatrix"): lane 8*j + r supplies the address of row r of matrix j;
// lane t receives in register j, half h, the element (t / 4, 2 * (t % 4) + h) of matrix j, or with
// .trans the element (2 * (t % 4) + h, t / 4).
#pragma once

#include <cstdint>

#include "tokenmix/host_device.h"

namespace tokenmix::simt::layout {

struct coord {
  int row, col;
};

TM_HOST_DEVICE constexpr coord mma_m16n8k16_a(int lane, int i) {
  return {(lane >> 2) + 8 * ((i >> 1) & 1), 2 * (lane & 3) + (i & 1) + 8 * (i >> 2)};
}

// (k, n) of B element i.
TM_HOST_DEVICE constexpr coord mma_m16n8k16_b(int lane, int i) {
  return {2 * (lane & 3) + (i & 1) + 8 * (i >> 1), lane >> 2};
}

TM_HOST_DEVICE constexpr coord mma_m16n8k16_c(int lane, int i) {
  return {(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)};
}

TM_HOST_DEVICE constexpr coord mma_m16n8k8_tf32_a(int lane, int i) {
  return {(lane >> 2) + 8 * (i & 1), (lane & 3) + 4 * (i >> 1)};
}

// (k, n) of B element i.
TM_HOST_DEVICE constexpr coord mma_m16n8k8_tf32_b(int lane, int i) {
  return {(lane & 3) + 4 * i, lane >> 2};
}

// (row, col) inside matrix j of the element that `lane` receives in register j, half `h`.
TM_HOST_DEVICE constexpr coord ldmatrix_element(int lane, int h, bool trans) {
  return trans ? coord{2 * (lane & 3) + h, lane >> 2} : coord{lane >> 2, 2 * (lane & 3) + h};
}

// The lane whose address gives row `row` of matrix `matrix`.
TM_HOST_DEVICE constexpr int ldmatrix_address_lane(int matrix, int row) {
  return 8 * matrix + row;
}

// ---- wgmma (sm_90a): warpgroup matrix multiply-accumulate m64nNk16 with f16/bf16 operands.
// Four consecutive warps (a warpgroup, warp w = rank 0..3) share one instruction; warp w owns rows
// 16w..16w+15 of A and D (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//   D (64xN, f32): element i = 0..N/2-1 of a lane is register i:
//     row = 16w + groupID + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * threadID_in_group + (i % 2)
//     (the m16n8 C fragments of the warp's 16 rows, for columns 8(i/4)..)
//   A from registers (64x16): element i = 0..7 of warp w as the m16n8k16 A fragment, rows + 16w.
// Operands in shared memory are named by a 64-bit matrix descriptor: start address, leading and
// stride byte offsets (each >> 4, 14 bits, at bits 0, 16 and 32), base offset (bits 49-51) and
// swizzle mode (bits 62-63). In 16-byte units, with U = 1 (none), 2, 4, 8 (32/64/128-byte
// swizzle) units per row of the swizzle atom, the canonical layouts of a 16-bit operand of one
// k16 step are (CuTe's make_gmma_desc, mma_sm90_desc.hpp / mma_traits_sm90_gmma.hpp):
//   K-major  (element (mn, k) in 16-byte unit k / 8 of row mn):
//     none:     ((8, m), 2) : ((1, SBO), LBO)
//     swizzled: ((8, m), 2) : ((U, SBO), 1)
//   MN-major (element (mn, k) in 16-byte unit mn / 8 of row k):
//     none:     (m, (8, 2)) : (SBO, (1, LBO))
//     swizzled: ((U, m), (8, 2)) : ((1, LBO), (U, SBO))
// and the swizzle XORs bits 4.. of the shared address with its bits 7.. (log2 U bits), so swizzled
// tiles start at a multiple of 128 U bytes. tests/test_simt_emulator.py checks these functions
// against CuTe's layouts.
enum class wgmma_swizzle : uint8_t { none = 0, b128 = 1, b64 = 2, b32 = 3 };

// 16-byte units per row of the swizzle atom (1 without swizzle).
TM_HOST_DEVICE constexpr uint32_t wgmma_swizzle_units(wgmma_swizzle s) {
  return s == wgmma_swizzle::b128  ? 8u
         : s == wgmma_swizzle::b64 ? 4u
         : s == wgmma_swizzle::b32 ? 2u
                                   : 1u;
}

TM_HOST_DEVICE constexpr uint64_t wgmma_descriptor(uint32_t start_address, uint32_t leading_bytes,
                                                   uint32_t stride_bytes, wgmma_swizzle s) {
  return uint64_t((start_address >> 4) & 0x3fffu) | uint64_t((leading_bytes >> 4) & 0x3fffu) << 16 |
         uint64_t((stride_bytes >> 4) & 0x3fffu) << 32 | uint64_t(s) << 62;
}

struct wgmma_descriptor_fields {
  uint32_t start, leading, stride, base_offset;  // bytes (base_offset: the 3-bit field)
  wgmma_swizzle swizzle;
};
TM_HOST_DEVICE constexpr wgmma_descriptor_fields decode_wgmma_descriptor(uint64_t d) {
  return {uint32_t(d & 0x3fffu) << 4, uint32_t(d >> 16 & 0x3fffu) << 4,
          uint32_t(d >> 32 & 0x3fffu) << 4, uint32_t(d >> 49 & 7u),
          wgmma_swizzle(uint32_t(d >> 62 & 3u))};
}

// Byte offset, before the swizzle, of 16-bit element (mn, k), k < 16, from the start address.
TM_HOST_DEVICE constexpr uint32_t wgmma_operand_offset(bool mn_major, wgmma_swizzle s,
                                                       uint32_t leading, uint32_t stride, int mn,
                                                       int k) {
  const uint32_t u = wgmma_swizzle_units(s);
  if (!mn_major) {
    const uint32_t row = uint32_t(mn & 7) * 16u * u + uint32_t(mn >> 3) * stride;
    const uint32_t unit =
        s == wgmma_swizzle::none ? uint32_t(k >> 3) * leading : uint32_t(k >> 3) * 16u;
    return row + unit + uint32_t(k & 7) * 2u;
  }
  const uint32_t unit = uint32_t(mn >> 3), in_unit = uint32_t(mn & 7) * 2u;
  if (s == wgmma_swizzle::none)
    return unit * stride + uint32_t(k & 7) * 16u + uint32_t(k >> 3) * leading + in_unit;
  return (unit % u) * 16u + (unit / u) * leading + uint32_t(k & 7) * 16u * u +
         uint32_t(k >> 3) * stride + in_unit;
}

// The shared address the swizzle maps `address` to.
TM_HOST_DEVICE constexpr uint32_t wgmma_swizzled(uint32_t address, wgmma_swizzle s) {
  return address ^ ((address >> 7) & (wgmma_swizzle_units(s) - 1u)) << 4;
}

// (row, col) of accumulator element i of `lane` in warp rank `warp` of the warpgroup.
TM_HOST_DEVICE constexpr coord wgmma_d(int warp, int lane, int i) {
  return {16 * warp + (lane >> 2) + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * (lane & 3) + (i & 1)};
}

// (row, col) of A-register element i (register i / 2, half i % 2) of `lane` in warp rank `warp`.
TM_HOST_DEVICE constexpr coord wgmma_a(int warp, int lane, int i) {
  return {16 * warp + mma_m16n8k16_a(lane, i).row, mma_m16n8k16_a(lane, i).col};
}

}  // namespace tokenmix::simt::layout
