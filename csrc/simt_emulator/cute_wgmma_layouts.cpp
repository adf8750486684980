// Checks the wgmma layouts of tokenmix/simt/layouts.h (used by the emulator and the kernels)
// against CuTe's own: the accumulator and A-register fragments, and, for every canonical shared
// memory layout CuTe builds (K- and MN-major, no swizzle and 32/64/128-byte swizzles), the
// address of every element of every k16 slice, decoded from the descriptor make_gmma_desc gives.
// Prints one line per check to stderr ("<check> checked <n> mismatches <m>"; stdout carries CuTe's
// host-side notice that it cannot convert shared pointers) and exits 1 on any mismatch. Built on
// the host by tests/test_simt_emulator.py when the nvidia-cutlass package is installed:
//   g++ -std=c++17 -I<cutlass_library>/source/include -I<cuda>/include -Icsrc/include
#include <cstdint>
#include <cstdio>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "tokenmix/simt/layouts.h"

namespace {

using namespace cute;
namespace L = tokenmix::simt::layout;
namespace G = cute::SM90::GMMA;

int g_failures = 0;

void report(const char* what, int checked, int bad) {
  std::fprintf(stderr, "%s checked %d mismatches %d\n", what, checked, bad);
  g_failures += bad;
}

// (thread of the warpgroup, value) -> m + 64 n (k) in CuTe's layouts.
template <int N>
void check_d() {
  int checked = 0, bad = 0;
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < N / 2; ++v) {
      const int idx = int(G::CLayout_64xN<N>{}(t, v));
      const L::coord ours = L::wgmma_d(t / 32, t % 32, v);
      bad += ours.row != idx % 64 || ours.col != idx / 64;
      ++checked;
    }
  char name[32];
  std::snprintf(name, sizeof name, "wgmma_d_n%d", N);
  report(name, checked, bad);
}

void check_a() {
  int checked = 0, bad = 0;
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < 8; ++v) {
      const int idx = int(G::ALayout_64x16{}(t, v));
      const L::coord ours = L::wgmma_a(t / 32, t % 32, v);
      bad += ours.row != idx % 64 || ours.col != idx / 64;
      ++checked;
    }
  report("wgmma_a", checked, bad);
}

alignas(1024) half_t g_buf[128 * 64 * 2];

template <G::Major kMajor>
L::wgmma_swizzle swizzle_of(const GmmaDescriptor& d) {
  switch (d.bitfield.layout_type_) {
    case 1: return L::wgmma_swizzle::b128;
    case 2: return L::wgmma_swizzle::b64;
    case 3: return L::wgmma_swizzle::b32;
    default: return L::wgmma_swizzle::none;
  }
}

// A (rows x 64) tile of the atom, cut into four k16 slices.
template <G::Major kMajor, class Atom, int kRows>
void check_smem(const char* name) {
  auto tile = make_tensor(make_smem_ptr(g_buf), tile_to_shape(Atom{}, Shape<Int<kRows>, _64>{}));
  const auto base = reinterpret_cast<uintptr_t>(g_buf);
  int checked = 0, bad = 0;
  for (int kk = 0; kk < 4; ++kk) {
    auto slice = local_tile(tile, Shape<Int<kRows>, _16>{}, make_coord(0, kk));
    const GmmaDescriptor desc = G::make_gmma_desc<kMajor>(slice);
    const uint32_t start =
        uint32_t(reinterpret_cast<uintptr_t>(raw_pointer_cast(slice.data())) - base);
    // The descriptor as the kernels would make it, with the slice's real start address.
    const uint64_t ours_desc = L::wgmma_descriptor(
        start, uint32_t(desc.bitfield.leading_byte_offset_) << 4,
        uint32_t(desc.bitfield.stride_byte_offset_) << 4, swizzle_of<kMajor>(desc));
    const L::wgmma_descriptor_fields f = L::decode_wgmma_descriptor(ours_desc);
    for (int mn = 0; mn < kRows; ++mn)
      for (int k = 0; k < 16; ++k) {
        const auto cute_at = uint32_t(reinterpret_cast<uintptr_t>(&slice(mn, k)) - base);
        const uint32_t at =
            L::wgmma_swizzled(f.start + L::wgmma_operand_offset(kMajor == G::Major::MN, f.swizzle,
                                                                f.leading, f.stride, mn, k),
                              f.swizzle);
        bad += at != cute_at;
        ++checked;
      }
  }
  report(name, checked, bad);
}

}  // namespace

int main() {
  check_d<16>();
  check_d<64>();
  check_d<128>();
  check_a();
  check_smem<G::Major::K, G::Layout_K_INTER_Atom<half_t>, 64>("smem_k_none_64");
  check_smem<G::Major::K, G::Layout_K_SW32_Atom<half_t>, 64>("smem_k_sw32_64");
  check_smem<G::Major::K, G::Layout_K_SW64_Atom<half_t>, 64>("smem_k_sw64_64");
  check_smem<G::Major::K, G::Layout_K_SW128_Atom<half_t>, 64>("smem_k_sw128_64");
  check_smem<G::Major::K, G::Layout_K_SW128_Atom<half_t>, 128>("smem_k_sw128_128");
  check_smem<G::Major::MN, G::Layout_MN_INTER_Atom<half_t>, 64>("smem_mn_none_64");
  check_smem<G::Major::MN, G::Layout_MN_SW32_Atom<half_t>, 64>("smem_mn_sw32_64");
  check_smem<G::Major::MN, G::Layout_MN_SW64_Atom<half_t>, 64>("smem_mn_sw64_64");
  check_smem<G::Major::MN, G::Layout_MN_SW128_Atom<half_t>, 64>("smem_mn_sw128_64");
  check_smem<G::Major::MN, G::Layout_MN_SW128_Atom<half_t>, 128>("smem_mn_sw128_128");
  return g_failures == 0 ? 0 : 1;
}
