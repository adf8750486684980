// The wgmma self-test GEMM, written once against tokenmix::simt: the host compiler builds it for
// the emulator (simt_selftest wgmma_*), and tests/test_simt_emulator.py compiles it with nvcc for
// sm_90a and checks that the wgmma calls became HGMMA instructions.
//
// Each block (one warpgroup) computes 64 rows of C. Per K stage it stores the A and B tiles in the
// canonical layout of the chosen swizzle (element by element through layouts.h, so every mode and
// major-ness is exercised), then issues one wgmma per 16 k.
#include "selftest_wgmma.h"
#include "tokenmix/simt/simt.h"

namespace tokenmix::simt_selftest {
#if defined(__CUDACC__)
inline namespace cuda {
#else
inline namespace emulated {
#endif

using namespace tokenmix::simt;
using layout::wgmma_swizzle;

namespace {

constexpr int kRows = 64, kThreads = 128;

// One operand tile of kt k by `rows` rows (m or n) in the canonical layout of `s`: the leading and
// stride byte offsets, the k width of a stage and the descriptor start of k-step kk.
struct TileLayout {
  bool mn_major;
  wgmma_swizzle s;
  int rows, kt;
  uint32_t leading, stride, bytes;

  TM_HOST_DEVICE TileLayout(bool mn_major_, wgmma_swizzle s_, int rows_)
      : mn_major(mn_major_), s(s_), rows(rows_) {
    const uint32_t u = layout::wgmma_swizzle_units(s);  // 16-byte units per swizzle-atom row
    if (s == wgmma_swizzle::none) {
      // 8 x 16-byte core matrices: k-halves (K-major) or k-groups (MN-major) 128 bytes apart
      kt = 16;
      leading = 128;
      stride = 256;
    } else if (!mn_major) {
      // rows of 16u bytes (8u k), 8-row groups 128u bytes apart; k-steps side by side in a row
      kt = int(8 * u);
      leading = 16;  // unused
      stride = 128 * u;
    } else {
      // k rows of 16u bytes (8u m/n each), 8-k groups 128u bytes apart, atoms of 8u m/n kt rows
      kt = 64;
      stride = 128 * u;
      leading = uint32_t(kt) * 16 * u;
    }
    const uint32_t groups = uint32_t(rows + 8 * int(u) - 1) / (8 * u);
    bytes = s == wgmma_swizzle::none ? uint32_t(rows) * uint32_t(kt) * 2
            : !mn_major              ? uint32_t(rows) * 16 * u
                                     : groups * leading;
  }
  // Unswizzled offset of k-step kk's start from the tile's start.
  TM_HOST_DEVICE uint32_t step_start(int kk) const {
    if (s == wgmma_swizzle::none) return 0;  // kt == 16
    return !mn_major ? uint32_t(kk) * 32 : uint32_t(kk) * 16 * 16 * layout::wgmma_swizzle_units(s);
  }
  // Byte offset of element (row, k), k < kt, from a tile start aligned to 1024.
  TM_HOST_DEVICE uint32_t offset(int row, int k) const {
    return layout::wgmma_swizzled(
        step_start(k / 16) +
            layout::wgmma_operand_offset(mn_major, s, leading, stride, row, k % 16),
        s);
  }
};

TM_HOST_DEVICE uint32_t round_up(uint32_t x, uint32_t to) {
  return (x + to - 1) / to * to;
}

}  // namespace

template <bool kBF16, int kN, bool kARegs, bool kTransB>
TM_GLOBAL void wgmma_gemm_kernel(global_ptr<const uint16_t> a, global_ptr<const uint16_t> b,
                                 global_ptr<float> c, int k, int swizzle, int bug) {
  const wgmma_swizzle s = wgmma_swizzle(swizzle);
  const TileLayout la(false, s, kRows), lb(kTransB, s, kN);
  const int kt = la.kt < lb.kt ? la.kt : lb.kt;  // the stage: both tiles hold it
  const int tid = int(linear_thread_idx()), lane = int(lane_id()), rank = int(warp_id()) & 3;
  const int row0 = int(block_idx().x) * kRows;
  const int n = kN;
  // Tiles start on 1024-byte boundaries of the shared window (the 128-byte swizzle's period).
  const shared_ptr<unsigned char> raw = dynamic_shared<unsigned char>();
  const uint32_t pad = round_up(shared_window_address(raw), 1024) - shared_window_address(raw);
  const shared_ptr<unsigned char> sa = raw + pad, sb = sa + round_up(la.bytes, 1024);

  float d[kN / 2];
  for (int i = 0; i < kN / 2; ++i) d[i] = 1e30f;  // the first wgmma must not accumulate onto it
  for (int k0 = 0; k0 < k; k0 += kt) {
    sync_threads();  // the previous stage's wgmmas completed (waited for) in every warp
    if (!kARegs)
      for (int e = tid; e < kRows * kt; e += kThreads) {
        const int r = e / kt, kk = e % kt;
        const uint16_t v = a[size_t(row0 + r) * k + k0 + kk];
        ptr_cast<uint16_t>(sa + la.offset(r, kk))[0] = v;
      }
    for (int e = tid; e < n * kt; e += kThreads) {
      const int col = e / kt, kk = e % kt;
      const uint16_t v = kTransB ? b[size_t(k0 + kk) * n + col] : b[size_t(col) * k + k0 + kk];
      ptr_cast<uint16_t>(sb + lb.offset(col, kk))[0] = v;
    }
    // Generic-proxy stores; wgmma reads through the async proxy.
    if (!(bug == int(wgmma_bug::no_proxy_fence) && k0 == 0)) fence_proxy_async_shared();
    sync_threads();
    if (!(bug == int(wgmma_bug::no_fence) && k0 == 0)) wgmma_fence();
    for (int kk = 0; kk < kt / 16; ++kk) {
      const uint64_t db = wgmma_descriptor(sb + lb.step_start(kk), lb.leading, lb.stride, s);
      const bool accumulate = k0 > 0 || kk > 0;
      if constexpr (kARegs) {
        uint32_t af[4];
        for (int i = 0; i < 4; ++i) {
          uint32_t pair = 0;
          for (int h = 0; h < 2; ++h) {
            const layout::coord e = layout::wgmma_a(rank, lane, 2 * i + h);
            pair |= uint32_t(a[size_t(row0 + e.row) * k + k0 + 16 * kk + e.col]) << (16 * h);
          }
          af[i] = pair;
        }
        wgmma_rs<kN, kBF16, kTransB>(d, af, db, accumulate);
        // af is read asynchronously: it must stay unchanged until the wait
        wgmma_commit_group();
        wgmma_wait_group<0>(d);
        if (kk + 1 < kt / 16) wgmma_fence();
      } else {
        const uint64_t da = wgmma_descriptor(sa + la.step_start(kk), la.leading, la.stride, s);
        wgmma_ss<kN, kBF16, false, kTransB>(d, da, db, accumulate);
      }
    }
    if (!kARegs) wgmma_commit_group();
    if (bug == int(wgmma_bug::overwrite_a) && lane == 0) {
      // the first element of the warp's own A rows (no other warp reads them)
      const shared_ptr<uint16_t> first = ptr_cast<uint16_t>(sa + la.offset(16 * rank, 0));
      const uint16_t v = first[0];
      first[0] = uint16_t(v ^ 0x8000u);  // another bit pattern, whatever A holds
    }
    if (bug == int(wgmma_bug::touch_accumulator)) d[0] += 1.0f;
    if (bug == int(wgmma_bug::no_wait) && k0 + kt >= k) return;
    if (!kARegs) wgmma_wait_group<0>(d);
  }
  for (int i = 0; i < kN / 2; ++i) {
    const layout::coord e = layout::wgmma_d(rank, lane, i);
    c[size_t(row0 + e.row) * n + e.col] = d[i];
  }
}

namespace {

template <bool kBF16, int kN, bool kARegs, bool kTransB>
void launch_one(const wgmma_gemm_config& cfg, const uint16_t* a, const uint16_t* b, float* c, int m,
                int k) {
  const wgmma_swizzle s = wgmma_swizzle(cfg.swizzle);
  const TileLayout la(false, s, kRows), lb(kTransB, s, kN);
  const size_t smem = 1024 + round_up(la.bytes, 1024) + lb.bytes;
  launch(wgmma_gemm_kernel<kBF16, kN, kARegs, kTransB>, dim3u(uint32_t(m / kRows)), dim3u(kThreads),
         smem, buffer(a, size_t(m) * k, "A"), buffer(b, size_t(k) * kN, "B"),
         buffer(c, size_t(m) * kN, "C"), k, cfg.swizzle, int(cfg.bug));
}

template <bool kBF16, int kN>
void launch_n(const wgmma_gemm_config& cfg, const uint16_t* a, const uint16_t* b, float* c, int m,
              int k) {
  if (cfg.a_in_registers)
    cfg.b_mn_major ? launch_one<kBF16, kN, true, true>(cfg, a, b, c, m, k)
                   : launch_one<kBF16, kN, true, false>(cfg, a, b, c, m, k);
  else
    cfg.b_mn_major ? launch_one<kBF16, kN, false, true>(cfg, a, b, c, m, k)
                   : launch_one<kBF16, kN, false, false>(cfg, a, b, c, m, k);
}

template <bool kBF16>
void launch_dtype(const wgmma_gemm_config& cfg, const uint16_t* a, const uint16_t* b, float* c,
                  int m, int k) {
  switch (cfg.n) {
    case 16: launch_n<kBF16, 16>(cfg, a, b, c, m, k); break;
    case 32: launch_n<kBF16, 32>(cfg, a, b, c, m, k); break;
    case 64: launch_n<kBF16, 64>(cfg, a, b, c, m, k); break;
    default: launch_n<kBF16, 128>(cfg, a, b, c, m, k); break;
  }
}

}  // namespace

void launch_wgmma_gemm(const wgmma_gemm_config& cfg, const uint16_t* a, const uint16_t* b, float* c,
                       int m, int k) {
  cfg.bf16 ? launch_dtype<true>(cfg, a, b, c, m, k) : launch_dtype<false>(cfg, a, b, c, m, k);
}

}  // namespace cuda / emulated
}  // namespace tokenmix::simt_selftest
