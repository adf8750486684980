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

}  // namespace tokenmix::simt::layout
