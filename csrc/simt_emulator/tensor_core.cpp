// SIMT emulator: mma.sync (m16n8k16 f16/bf16, m16n8k8 tf32) and ldmatrix as warp collectives,
// through the fragment tables of tokenmix/simt/layouts.h (the PTX ISA's layouts).
#include <atomic>

#include "internal.h"

namespace tokenmix::simt::emu {
namespace {

struct mma_operands {
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

double element(uint32_t reg, int half, bool bf16) {
  const uint16_t h = uint16_t(reg >> (16 * half));
  return bf16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}

// D = A * B + C for one warp, K = 16 (f16/bf16) or 8 (tf32). Products of f16/bf16/tf32 values are
// exact in double and the sum of K of them plus C is rounded to f32 once; the GPU's internal
// accumulation order and rounding are not modelled (results agree to about 1 f32 ulp of the
// largest term). tf32 operands are read with their low 13 bits ignored, as the instruction reads
// a 32-bit register (kernels round with f32_to_tf32_bits first).
void mma(collective& c, mma_type type) {
  const int K = type == mma_tf32 ? 8 : 16;
  double a[16][16], b[16][8], acc[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* op = static_cast<const mma_operands*>(c.lane[lane].in);
    if (type == mma_tf32) {
      for (int i = 0; i < 4; ++i) {
        const layout::coord e = layout::mma_m16n8k8_tf32_a(lane, i);
        a[e.row][e.col] = bits_float(op->a[i] & 0xffffe000u);
      }
      for (int i = 0; i < 2; ++i) {
        const layout::coord e = layout::mma_m16n8k8_tf32_b(lane, i);
        b[e.row][e.col] = bits_float(op->b[i] & 0xffffe000u);
      }
    } else {
      const bool bf16 = type == mma_bf16;
      for (int i = 0; i < 8; ++i) {
        const layout::coord e = layout::mma_m16n8k16_a(lane, i);
        a[e.row][e.col] = element(op->a[i / 2], i % 2, bf16);
      }
      for (int i = 0; i < 4; ++i) {
        const layout::coord e = layout::mma_m16n8k16_b(lane, i);
        b[e.row][e.col] = element(op->b[i / 2], i % 2, bf16);
      }
    }
    for (int i = 0; i < 4; ++i) {
      const layout::coord f = layout::mma_m16n8k16_c(lane, i);
      acc[f.row][f.col] = op->c[i];
    }
  }
  float d[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double s = acc[m][n];
      for (int k = 0; k < K; ++k) s += a[m][k] * b[k][n];
      d[m][n] = float(s);
    }
  for (int lane = 0; lane < 32; ++lane) {
    float* out = static_cast<float*>(c.lane[lane].out);  // may alias c: all inputs were read above
    for (int i = 0; i < 4; ++i) {
      const layout::coord f = layout::mma_m16n8k16_c(lane, i);
      out[i] = d[f.row][f.col];
    }
  }
}

void ldmatrix(warp_state&, uint32_t wi, collective& c) {
  worker& w = this_worker();
  const int count = c.mode & 7;
  const bool trans = (c.mode & 8) != 0;
  uint16_t m[4][8][8];
  for (int j = 0; j < count; ++j)
    for (int r = 0; r < 8; ++r) {
      const int lane = layout::ldmatrix_address_lane(j, r);
      const auto addr = reinterpret_cast<uintptr_t>(c.lane[lane].in);
      // The row is read by the lane that supplied its address.
      check_shared(w.threads[wi * kWarpSize + uint32_t(lane)], addr, 16, 16, access::read,
                   c.lane[lane].operand);
      std::memcpy(m[j][r], c.lane[lane].in, 16);
    }
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* regs = static_cast<uint32_t*>(c.lane[lane].out);
    for (int j = 0; j < count; ++j) {
      const layout::coord lo = layout::ldmatrix_element(lane, 0, trans);
      const layout::coord hi = layout::ldmatrix_element(lane, 1, trans);
      regs[j] = pack_b16x2(m[j][lo.row][lo.col], m[j][hi.row][hi.col]);
    }
  }
}

std::atomic<uint64_t> mma_done{0};

}  // namespace

uint64_t mma_instructions() {
  return mma_done.load(std::memory_order_relaxed);
}

void complete_tensor_op(warp_state& ws, uint32_t wi, collective& c) {
  if (c.kind == coll_kind::mma) {
    mma(c, mma_type(c.mode));
    mma_done.fetch_add(1, std::memory_order_relaxed);
  } else
    ldmatrix(ws, wi, c);
}

void mma_m16n8k16(bool bf16, float* d, const uint32_t* a, const uint32_t* b, const float* c,
                  const char* file, int line) {
  const mma_operands op{a, b, c};
  collective_arrive(coll_kind::mma, bf16 ? mma_bf16 : mma_f16, 0xffffffffu, lane_args{0, 0, &op, d},
                    file, line);
}

void mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b, const float* c,
                      const char* file, int line) {
  const mma_operands op{a, b, c};
  collective_arrive(coll_kind::mma, mma_tf32, 0xffffffffu, lane_args{0, 0, &op, d}, file, line);
}

void ldmatrix(int count, bool trans, uint32_t* regs, const void* row, uint32_t row_region,
              const char* file, int line) {
  // operand: the buffer of the row pointer
  collective_arrive(coll_kind::ldmatrix, uint8_t(count | (trans ? 8 : 0)), 0xffffffffu,
                    lane_args{0, row_region, row, regs}, file, line);
}

}  // namespace tokenmix::simt::emu
