// Prints CuTe's own fragment layouts for the atoms the SIMT emulator implements, in the format of
// `simt_selftest layouts`, so tests/test_simt_emulator.py can compare them. Built on the host by
// the test, only when the nvidia-cutlass package (CuTe headers) and the CUDA headers are present:
//   g++ -std=c++17 -I<cutlass_library>/source/include -I<cuda>/include [-I<cuda>/include/cccl]
#include <cstdio>
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/layout.hpp>
#include <map>
#include <utility>

namespace {

using namespace cute;

// (thread, value) -> index into the column-major (rows x cols) tile; prints (row, col).
template <class Layout>
void print_tv(const char* name, Layout layout, int values, int rows) {
  for (int t = 0; t < 32; ++t)
    for (int v = 0; v < values; ++v) {
      const int idx = int(layout(t, v));
      std::printf("%s %d %d %d %d\n", name, t, v, idx % rows, idx / rows);
    }
}

template <class Op>
void print_mma(const char* prefix) {
  using Traits = MMA_Traits<Op>;
  char name[32];
  std::snprintf(name, sizeof name, "%smma_a", prefix);
  print_tv(name, typename Traits::ALayout{}, 8, 16);  // (M, K) = (16, 16)
  std::snprintf(name, sizeof name, "%smma_b", prefix);
  // (N, K) = (8, 16): print (k, n) like the emulator
  for (int t = 0; t < 32; ++t)
    for (int v = 0; v < 4; ++v) {
      const int idx = int(typename Traits::BLayout{}(t, v));
      std::printf("%s %d %d %d %d\n", name, t, v, idx / 8, idx % 8);
    }
  std::snprintf(name, sizeof name, "%smma_c", prefix);
  print_tv(name, typename Traits::CLayout{}, 4, 16);  // (M, N) = (16, 8)
}

// m16n8k8 tf32: A (M, K) = (16, 8), B (N, K) = (8, 8), printed as (k, n); C as for m16n8k16.
void print_mma_tf32() {
  using Traits = MMA_Traits<SM80_16x8x8_F32TF32TF32F32_TN>;
  print_tv("tf32_mma_a", typename Traits::ALayout{}, 4, 16);
  for (int t = 0; t < 32; ++t)
    for (int v = 0; v < 2; ++v) {
      const int idx = int(typename Traits::BLayout{}(t, v));
      std::printf("tf32_mma_b %d %d %d %d\n", t, v, idx / 8, idx % 8);
    }
}

// Each destination 16-bit slot of each lane: which source lane's row (matrix = lane / 8,
// row = lane % 8) and which element of that row it holds.
template <class Op>
void print_ldsm(const char* name, int regs) {
  using Traits = Copy_Traits<Op>;
  std::map<int, std::pair<int, int>> source;  // bit -> (lane, bit in the lane's 128-bit row)
  for (int t = 31; t >= 0; --t)  // lowest lane wins where lanes alias (ignored addresses)
    for (int b = 0; b < 128; ++b) source[int(typename Traits::SrcLayout{}(t, b))] = {t, b};
  for (int t = 0; t < 32; ++t)
    for (int j = 0; j < regs; ++j)
      for (int h = 0; h < 2; ++h) {
        const auto s = source.at(int(typename Traits::DstLayout{}(t, 32 * j + 16 * h)));
        std::printf("%s %d %d %d %d %d %d\n", name, t, j, h, s.first / 8, s.first % 8,
                    s.second / 16);
      }
}

}  // namespace

int main() {
  print_mma<SM80_16x8x16_F32F16F16F32_TN>("");
  print_mma<SM80_16x8x16_F32BF16BF16F32_TN>("bf16_");
  print_mma_tf32();
  print_ldsm<SM75_U32x1_LDSM_N>("ldsm_x1", 1);
  print_ldsm<SM75_U32x2_LDSM_N>("ldsm_x2", 2);
  print_ldsm<SM75_U32x4_LDSM_N>("ldsm_x4", 4);
  print_ldsm<SM75_U16x2_LDSM_T>("ldsm_x1_trans", 1);
  print_ldsm<SM75_U16x4_LDSM_T>("ldsm_x2_trans", 2);
  print_ldsm<SM75_U16x8_LDSM_T>("ldsm_x4_trans", 4);
  return 0;
}
