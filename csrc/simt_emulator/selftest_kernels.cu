// Kernels of the SIMT self-test, written once against tokenmix::simt. The host compiler builds
// this file for the emulator (simt_selftest); tests/test_simt_emulator.py also compiles it with
// nvcc for sm_80 and sm_90 and checks the ptxas report for spills.
#include "selftest_kernels.h"
#include "tokenmix/simt/simt.h"

namespace tokenmix::simt_selftest {
#if defined(__CUDACC__)
inline namespace cuda {
#else
inline namespace emulated {
#endif

using namespace tokenmix::simt;
constexpr uint32_t kFull = 0xffffffffu;

// ---- warp collectives --------------------------------------------------------------------------

TM_GLOBAL void shuffle_kernel(global_ptr<int> out_i, global_ptr<float> out_f,
                              global_ptr<unsigned> out_u) {
  const int tid = int(linear_thread_idx()), lane = int(lane_id()), warp = int(warp_id());
  const int base = 1000 * warp + lane;
  int r[kShuffleResults];
  r[0] = shfl_sync(kFull, base, (lane * 7 + 3) & 31);
  r[1] = shfl_up_sync(kFull, base, 3);
  r[2] = shfl_down_sync(kFull, base, 5);
  r[3] = shfl_xor_sync(kFull, base, 9);
  if (lane < 16)  // two disjoint member masks in flight at once
    r[4] = shfl_xor_sync(0x0000ffffu, base, 4);
  else
    r[4] = shfl_xor_sync(0xffff0000u, base, 4);
  r[5] = shfl_sync(kFull, base, lane + 40);  // source lane taken modulo 32
  r[6] = shfl_up_sync(kFull, base, 0);
  r[7] = -1;
  if (lane >= 8 && lane < 16) r[7] = shfl_sync(0x0000ff00u, base, 8);
  for (int k = 0; k < kShuffleResults; ++k) out_i[k * kShuffleThreads + tid] = r[k];
  out_f[tid] = shfl_xor_sync(kFull, float(base) * 0.5f, 1);
  out_u[tid] = shfl_down_sync(kFull, 0x80000000u + unsigned(base), 16);
}

TM_GLOBAL void vote_kernel(global_ptr<uint32_t> out) {
  const int tid = int(linear_thread_idx()), lane = int(lane_id()), warp = int(warp_id());
  uint32_t o[kVoteResults];
  o[0] = ballot_sync(kFull, lane % 3 == 0);
  o[1] = uint32_t(any_sync(kFull, warp == 1 && lane == 31));
  o[2] = uint32_t(all_sync(kFull, lane < 32));
  o[3] = uint32_t(all_sync(kFull, lane != 5));
  if (lane < 8)
    o[4] = ballot_sync(0x000000ffu, lane & 1);
  else
    o[4] = ballot_sync(0xffffff00u, 1);
  sync_warp(kFull);
  o[5] = uint32_t(any_sync(kFull, 0));
  for (int k = 0; k < kVoteResults; ++k) out[k * kVoteThreads + tid] = o[k];
}

// Lanes exchange values through shared memory; without the sync_warp this is a race.
template <bool kSyncWarp>
TM_GLOBAL void warp_exchange_kernel(global_ptr<uint32_t> out) {
  TM_SHARED(uint32_t, slots, 64);
  const int tid = int(linear_thread_idx());
  slots[tid] = 0;
  sync_threads();
  slots[tid] = uint32_t(tid) * 3u;
  if (kSyncWarp) sync_warp();
  out[tid] = slots[tid ^ 1];
}

TM_GLOBAL void index_kernel(global_ptr<uint32_t> out) {
  const dim3u t = thread_idx(), b = block_idx(), bd = block_dim(), gd = grid_dim();
  const uint32_t block = b.x + gd.x * (b.y + gd.y * b.z);
  const uint32_t slot = 4 * (block * bd.volume() + t.x + bd.x * (t.y + bd.y * t.z));
  out[slot] = t.x | t.y << 8 | t.z << 16;
  out[slot + 1] = b.x | b.y << 8 | b.z << 16;
  out[slot + 2] = lane_id() | warp_id() << 8;
  out[slot + 3] = linear_thread_idx();
}

// ---- shared memory, barriers, atomics, vector accesses -----------------------------------------

TM_GLOBAL void reduce_kernel(global_ptr<const float> in, int n, global_ptr<float> out) {
  TM_SHARED(float, partial, kReduceThreads);
  const int tid = int(thread_idx().x);
  const int stride = int(block_dim().x * grid_dim().x);
  float s = 0.0f;
  for (int i = int(block_idx().x * block_dim().x) + tid; i < n; i += stride) s += in[i];
  partial[tid] = s;
  sync_threads();
  for (int h = kReduceThreads / 2; h >= 32; h >>= 1) {
    if (tid < h) partial[tid] += partial[tid + h];
    sync_threads();
  }
  if (tid < 32) {
    float v = partial[tid];
    for (int o = 16; o > 0; o >>= 1) v += shfl_down_sync(kFull, v, unsigned(o));
    if (tid == 0) out[block_idx().x] = v;
  }
}

TM_GLOBAL void atomics_kernel(global_ptr<float> fsum, global_ptr<int> isum,
                              global_ptr<unsigned> usum, global_ptr<int> imax,
                              global_ptr<int> per_block) {
  TM_SHARED(int, counters, 2);
  TM_SHARED(float, fshared, 1);
  const int tid = int(thread_idx().x), b = int(block_idx().x);
  if (tid == 0) {
    counters[0] = 0;
    counters[1] = -1000;
    fshared[0] = 0.0f;
  }
  sync_threads();
  atomic_add(fsum, 1.0f);
  atomic_add(isum, tid);
  atomic_add(usum, 2u);
  atomic_max(imax, b * 1000 + tid);
  atomic_add(counters, 1);
  atomic_max(counters + 1, tid);
  atomic_add(fshared, 0.5f);
  sync_threads();
  if (tid == 0) {
    per_block[3 * b] = counters[0];
    per_block[3 * b + 1] = counters[1];
    per_block[3 * b + 2] = int(fshared[0]);
  }
}

// Every lane adds to its warp's counter; sync_warp orders the atomics before one lane's read, and
// that read before the next round of atomics.
TM_GLOBAL void atomic_warp_kernel(global_ptr<int> out) {
  TM_SHARED(int, count, kAtomicWarpThreads / 32);
  const int lane = int(lane_id()), warp = int(warp_id());
  if (lane == 0) count[warp] = 0;
  sync_warp();
  atomic_add(count + warp, lane + 1);
  sync_warp();
  if (lane == 31) out[2 * warp] = count[warp];
  sync_warp();
  atomic_add(count + warp, 1);
  sync_warp();
  if (lane == 5) out[2 * warp + 1] = count[warp];
}

TM_GLOBAL void vec128_kernel(global_ptr<const uint32_t> in, global_ptr<uint32_t> out) {
  TM_SHARED_ALIGNED(uint32_t, staging, 4 * kVecThreads, 16);
  const int tid = int(thread_idx().x);
  store128(staging + 4 * tid, load128(in + 4 * tid));
  sync_threads();
  store128(out + 4 * tid, load128(staging + 4 * (tid ^ 1)));
}

TM_GLOBAL void math_kernel(global_ptr<const float> in, global_ptr<float> out, int n) {
  const int i = int(block_idx().x * block_dim().x + thread_idx().x);
  if (i >= n) return;
  const float x = in[i];
  out[6 * i] = exp2f_approx(x);
  out[6 * i + 1] = expf_approx(x);
  out[6 * i + 2] = log2f_approx(x);
  out[6 * i + 3] = rcp(x);
  out[6 * i + 4] = rsqrt(x);
  out[6 * i + 5] = exp2f_ftz(x);
}

// ---- tensor cores ------------------------------------------------------------------------------

// d = A * B + (A * B + C): two chained mma, the second accumulating in place.
template <bool kBF16>
TM_GLOBAL void mma_kernel(global_ptr<const uint32_t> a, global_ptr<const uint32_t> b,
                          global_ptr<const float> c, global_ptr<float> d) {
  const int t = int(linear_thread_idx());
  uint32_t af[4], bf[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) af[i] = a[4 * t + i];
  for (int i = 0; i < 2; ++i) bf[i] = b[2 * t + i];
  for (int i = 0; i < 4; ++i) acc[i] = c[4 * t + i];
  for (int rep = 0; rep < 2; ++rep) {
    if (kBF16)
      mma_m16n8k16_bf16f32(acc, af, bf, acc);
    else
      mma_m16n8k16_f16f32(acc, af, bf, acc);
  }
  for (int i = 0; i < 4; ++i) d[4 * t + i] = acc[i];
}

// m16n8k8 tf32: the operands rounded from float32 by the kernel, then d = A * B + (A * B + C).
TM_GLOBAL void mma_tf32_kernel(global_ptr<const uint32_t> a, global_ptr<const uint32_t> b,
                               global_ptr<const float> c, global_ptr<float> d) {
  const int t = int(linear_thread_idx());
  uint32_t af[4], bf[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) af[i] = f32_to_tf32_bits(bits_float(a[4 * t + i]));
  for (int i = 0; i < 2; ++i) bf[i] = f32_to_tf32_bits(bits_float(b[2 * t + i]));
  for (int i = 0; i < 4; ++i) acc[i] = c[4 * t + i];
  for (int rep = 0; rep < 2; ++rep) mma_m16n8k8_tf32f32(acc, af, bf, acc);
  for (int i = 0; i < 4; ++i) d[4 * t + i] = acc[i];
}

// Lane l gives the address of physical row (5 l + 3) % 32; lanes that the instruction ignores
// give a misaligned address, which must not be touched.
TM_GLOBAL void ldmatrix_kernel(global_ptr<const uint16_t> rows, global_ptr<uint32_t> out) {
  TM_SHARED_ALIGNED(uint16_t, tile, 32 * 8, 16);
  const int lane = int(lane_id());
  for (int k = 0; k < 8; ++k) tile[lane * 8 + k] = rows[lane * 8 + k];
  sync_threads();
  const shared_ptr<uint16_t> row = tile + 8 * ((lane * 5 + 3) & 31);
  const shared_ptr<uint16_t> ignored = tile + 1;
  for (int v = 0; v < kLdmatrixVariants; ++v) {
    uint32_t r[4] = {0, 0, 0, 0};
    switch (v) {
      case 0: ldmatrix_x1(r, lane < 8 ? row : ignored); break;
      case 1: ldmatrix_x2(r, lane < 16 ? row : ignored); break;
      case 2: ldmatrix_x4(r, row); break;
      case 3: ldmatrix_x1_trans(r, lane < 8 ? row : ignored); break;
      case 4: ldmatrix_x2_trans(r, lane < 16 ? row : ignored); break;
      default: ldmatrix_x4_trans(r, row); break;
    }
    for (int j = 0; j < 4; ++j) out[(v * 32 + lane) * 4 + j] = r[j];
  }
}

// ---- cp.async ----------------------------------------------------------------------------------

TM_GLOBAL void cp_async_kernel(global_ptr<const uint32_t> in, global_ptr<uint32_t> out) {
  TM_SHARED_ALIGNED(uint32_t, s16, 4 * kCpAsyncThreads, 16);
  TM_SHARED_ALIGNED(uint32_t, s8, 2 * kCpAsyncThreads, 8);
  TM_SHARED(uint32_t, s4, kCpAsyncThreads);
  TM_SHARED_ALIGNED(uint32_t, sz, 4 * kCpAsyncThreads, 16);
  const int t = int(thread_idx().x);
  cp_async<16>(s16 + 4 * t, in + 4 * t);
  cp_async_commit_group();  // group 0
  cp_async<8>(s8 + 2 * t, in + 256 + 2 * t);
  cp_async<4>(s4 + t, in + 384 + t);
  cp_async_commit_group();  // group 1
  cp_async_zfill<16>(sz + 4 * t, in + 448 + 4 * t, 4 * (t % 5));
  cp_async_commit_group();   // group 2
  cp_async_commit_group();   // group 3 (empty)
  cp_async_wait_group<3>();  // group 0 has landed, for this thread
  out[t] = s16[4 * t];
  cp_async_wait_group<0>();
  sync_threads();  // every thread's copies are visible to the block
  const int nb = (t + 1) % kCpAsyncThreads;
  for (int k = 0; k < 4; ++k) out[64 + 4 * t + k] = s16[4 * nb + k];
  for (int k = 0; k < 2; ++k) out[320 + 2 * t + k] = s8[2 * nb + k];
  out[448 + t] = s4[nb];
  for (int k = 0; k < 4; ++k) out[512 + 4 * t + k] = sz[4 * nb + k];
}

// ---- tiled GEMM: cp.async double buffering, ldmatrix, mma.sync m16n8k16 ------------------------
// 64x64 block tile, BK = 32, 4 warps in 2x2, each warp 32x32 (2 x 4 mma tiles). A is row major
// (ldmatrix), B is row major K x N (ldmatrix.trans gives the column-major B fragment).

constexpr int kBK = 32, kGemmThreads = 128;
constexpr int kAStride = kBK + 8;        // halves per A row in shared memory (80 bytes)
constexpr int kBStride = kGemmTile + 8;  // halves per B row (144 bytes)
constexpr int kAStage = kGemmTile * kAStride, kBStage = kBK * kBStride;

template <bool kBF16, bool kTrailingBarrier>
TM_GLOBAL void gemm_kernel(global_ptr<const uint16_t> a, global_ptr<const uint16_t> b,
                           global_ptr<float> c, int m, int n, int k) {
  TM_SHARED_ALIGNED(uint16_t, sa, 2 * kAStage, 16);
  TM_SHARED_ALIGNED(uint16_t, sb, 2 * kBStage, 16);
  const int tid = int(linear_thread_idx()), lane = int(lane_id()), warp = int(warp_id());
  const int m0 = int(block_idx().y) * kGemmTile, n0 = int(block_idx().x) * kGemmTile;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int ktiles = (k + kBK - 1) / kBK;

  // A tile: 64 rows x 4 chunks of 8 halves; B tile: 32 rows x 8 chunks. Two of each per thread.
  auto load_tile = [&](int kt, int stage) {
    for (int i = 0; i < 2; ++i) {
      const int chunk = tid + i * kGemmThreads;
      const int ar = chunk >> 2, ac = (chunk & 3) * 8;
      const int gm = m0 + ar, gk = kt * kBK + ac;
      const bool a_in = gm < m && gk < k;
      cp_async_zfill<16>(sa + stage * kAStage + ar * kAStride + ac,
                         a + (a_in ? ptrdiff_t(gm) * k + gk : 0), a_in ? 16 : 0);
      const int br = chunk >> 3, bc = (chunk & 7) * 8;
      const int gk2 = kt * kBK + br, gn = n0 + bc;
      const bool b_in = gk2 < k && gn < n;
      cp_async_zfill<16>(sb + stage * kBStage + br * kBStride + bc,
                         b + (b_in ? ptrdiff_t(gk2) * n + gn : 0), b_in ? 16 : 0);
    }
  };

  float acc[2][4][4];
  for (int mi = 0; mi < 2; ++mi)
    for (int ni = 0; ni < 4; ++ni)
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;

  load_tile(0, 0);
  cp_async_commit_group();
  for (int kt = 0; kt < ktiles; ++kt) {
    if (kt + 1 < ktiles) load_tile(kt + 1, (kt + 1) & 1);
    cp_async_commit_group();
    cp_async_wait_group<1>();  // this thread's part of tile kt has landed
    sync_threads();            // ... and every other thread's
    const int st = kt & 1;
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[2][4], bf[4][2];
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(af[mi], sa + st * kAStage + (wm + mi * 16 + (lane & 15)) * kAStride + ks +
                                (lane >> 4) * 8);
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t r[4];
        ldmatrix_x4_trans(
            r, sb + st * kBStage + (ks + (lane & 15)) * kBStride + wn + nj * 16 + (lane >> 4) * 8);
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
      for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni) {
          if (kBF16)
            mma_m16n8k16_bf16f32(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
          else
            mma_m16n8k16_f16f32(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
        }
    }
    if (kTrailingBarrier) sync_threads();  // the next load overwrites the stage just read
  }
  cp_async_wait_group<0>();

  for (int mi = 0; mi < 2; ++mi)
    for (int ni = 0; ni < 4; ++ni)
      for (int i = 0; i < 4; ++i) {
        const layout::coord e = layout::mma_m16n8k16_c(lane, i);
        const int row = m0 + wm + mi * 16 + e.row, col = n0 + wn + ni * 8 + e.col;
        if (row < m && col < n) c[ptrdiff_t(row) * n + col] = acc[mi][ni][i];
      }
}

// ---- planted bugs ------------------------------------------------------------------------------

TM_GLOBAL void oob_read_kernel(global_ptr<const float> in, global_ptr<float> out, int n) {
  const int i = int(block_idx().x * block_dim().x + thread_idx().x);
  if (i <= n) out[i] = in[i] * 2.0f;  // bug: `<=` reads in[n]
}

TM_GLOBAL void misaligned_kernel(global_ptr<const float> in, global_ptr<float> out) {
  const int t = int(thread_idx().x);
  const u32x4 v = load128(in + 4 * t + 1);  // bug: only 4-byte aligned
  out[t] = bits_float(v.x);
}

TM_GLOBAL void barrier_exit_kernel(global_ptr<float> out) {
  TM_SHARED(float, vals, 64);
  const int t = int(thread_idx().x);
  if (t >= 48) return;  // bug: these threads never reach the barrier
  vals[t] = float(t);
  sync_threads();
  out[t] = vals[(t + 1) % 48];
}

TM_GLOBAL void barrier_sites_kernel(global_ptr<float> out) {
  const int t = int(thread_idx().x);
  if (t < 32) {
    sync_threads();  // bug: two different barriers
    out[t] = 1.0f;
  } else {
    sync_threads();
    out[t] = 2.0f;
  }
}

TM_GLOBAL void shfl_half_kernel(global_ptr<int> out) {
  const int lane = int(lane_id());
  int v = lane;
  if (lane < 16) v = shfl_xor_sync(kFull, v, 1);  // bug: half of the member mask arrives
  out[thread_idx().x] = v;
}

TM_GLOBAL void race_kernel(global_ptr<float> out) {
  TM_SHARED(float, flag, 32);
  const int t = int(thread_idx().x);
  if (t == 0) flag[0] = 42.0f;
  out[t] = flag[0];  // bug: no sync_threads() between thread 0's write and this read
}

TM_GLOBAL void cp_async_early_kernel(global_ptr<const uint32_t> in, global_ptr<uint32_t> out) {
  TM_SHARED_ALIGNED(uint32_t, buf, 4 * 32, 16);
  const int t = int(thread_idx().x);
  cp_async<16>(buf + 4 * t, in + 4 * t);
  cp_async_commit_group();
  const uint32_t early = buf[4 * t];  // bug: read before cp_async_wait_group
  cp_async_wait_group<0>();
  out[t] = early;
}

TM_GLOBAL void shared_oob_kernel(global_ptr<float> out) {
  TM_SHARED(float, vals, 32);
  const int t = int(thread_idx().x);
  vals[t + 1] = 1.0f;  // bug: thread 31 writes vals[32]
  sync_threads();
  out[t] = vals[t];
}

TM_GLOBAL void uninitialized_kernel(global_ptr<float> out) {
  TM_SHARED(float, vals, 32);
  const int t = int(thread_idx().x);
  if (t != 7) vals[t] = 1.0f;
  sync_threads();
  out[t] = vals[t];  // bug: nobody wrote vals[7]
}

TM_GLOBAL void shfl_barrier_kernel(global_ptr<int> out) {
  const int lane = int(lane_id());
  int v = lane;
  if (lane < 16) v = shfl_xor_sync(kFull, v, 1);  // bug: lanes 16-31 go to the barrier instead
  sync_threads();
  out[thread_idx().x] = v;
}

TM_GLOBAL void collective_mismatch_kernel(global_ptr<uint32_t> out) {
  const int lane = int(lane_id());
  uint32_t v;
  if (lane < 16)  // bug: the two halves of the member mask call different collectives
    v = uint32_t(shfl_sync(kFull, lane, 0));
  else
    v = ballot_sync(kFull, 1);
  out[thread_idx().x] = v;
}

TM_GLOBAL void atomics_then_read_kernel(global_ptr<int> out) {
  TM_SHARED(int, count, 1);
  const int lane = int(lane_id());
  if (lane == 0) count[0] = 0;
  sync_warp();
  atomic_add(count, 1);
  if (lane < 16) sync_warp(0x0000ffffu);
  if (lane == 0) out[0] = count[0];  // bug: lanes 16-31 took no part in the sync_warp
}

TM_GLOBAL void read_then_atomics_kernel(global_ptr<int> out) {
  TM_SHARED(int, count, 1);
  const int lane = int(lane_id());
  if (lane == 0) count[0] = 0;
  sync_warp();
  if (lane == 1) out[0] = count[0];
  if (lane == 1 || lane == 2) sync_warp(0x6u);
  if (lane == 2 || lane == 3) atomic_add(count, 1);  // bug: lane 3 is not ordered after the read
}

TM_GLOBAL void write_then_atomics_kernel(global_ptr<int> out) {
  TM_SHARED(int, count, 1);
  const int lane = int(lane_id());
  if (lane == 0) count[0] = 5;
  if (lane < 2) sync_warp(0x3u);
  if (lane == 1 || lane == 2) atomic_add(count, 1);  // bug: lane 2 is not ordered after the write
  sync_warp();
  if (lane == 0) out[0] = count[0];
}

// Lane 0 waits for lane 1 through an atomic (works on sm_70+ GPUs, whose lanes progress
// independently; the emulator runs lane 1 only when lane 0 reaches a synchronization point).
TM_GLOBAL void spin_warp_kernel(global_ptr<int> out) {
  TM_SHARED(int, flag, 1);
  const int lane = int(lane_id());
  if (lane == 0) flag[0] = 0;
  sync_warp();
  if (lane == 0)
    while (atomic_add(flag, 0) == 0) {
    }
  if (lane == 1) atomic_add(flag, 1);
  out[lane] = lane;
}

// Block 0 waits for a flag that block 1 sets: blocks run one after another here, and a GPU need not
// run them at the same time either.
TM_GLOBAL void spin_blocks_kernel(global_ptr<int> flag) {
  if (thread_idx().x != 0) return;
  if (block_idx().x == 0)
    while (flag[0] == 0) {
    }
  else
    flag[0] = 1;
}

// q and k: neighbouring views of one packed buffer, registered separately.
TM_GLOBAL void packed_views_kernel(global_ptr<const float> q, global_ptr<const float> k,
                                   global_ptr<float> out, int n) {
  const int t = int(thread_idx().x);
  out[t] = q[t] + k[t] + q[t + n];  // bug: q[t + n] is k[t]
}

// The same through raw pointers in a parameter struct (like NaParams), made checked in the kernel.
struct packed_params {
  const float* q;
  const float* k;
  float* out;
  int n;
};
TM_GLOBAL void packed_params_kernel(packed_params p) {
  const global_ptr<const float> q(p.q), k(p.k);
  const global_ptr<float> out(p.out);
  const int t = int(thread_idx().x);
  out[t] = q[t] + k[t] + q[t + p.n];  // bug: q[t + n] is k[t]
}

TM_GLOBAL void shared_views_kernel(global_ptr<float> out) {
  TM_SHARED(float, a, 32);
  TM_SHARED(float, b, 32);
  const int t = int(thread_idx().x);
  b[t] = 0.0f;
  a[t + (b - a)] = 1.0f;  // bug: an index into b through a
  sync_threads();
  out[t] = b[t];
}

// ---- host entry points -------------------------------------------------------------------------

void launch_shuffles(int* out_i, float* out_f, unsigned* out_u) {
  launch(shuffle_kernel, dim3u(1), dim3u(kShuffleThreads), 0,
         buffer(out_i, kShuffleResults * kShuffleThreads, "out_i"),
         buffer(out_f, kShuffleThreads, "out_f"), buffer(out_u, kShuffleThreads, "out_u"));
}

void launch_votes(uint32_t* out) {
  launch(vote_kernel, dim3u(1), dim3u(kVoteThreads), 0,
         buffer(out, kVoteResults * kVoteThreads, "out"));
}

void launch_warp_exchange(uint32_t* out, bool with_sync_warp) {
  if (with_sync_warp)
    launch(warp_exchange_kernel<true>, dim3u(1), dim3u(64), 0, buffer(out, 64, "out"));
  else
    launch(warp_exchange_kernel<false>, dim3u(1), dim3u(64), 0, buffer(out, 64, "out"));
}

void launch_indices(uint32_t* out) {
  launch(index_kernel, dim3u(2, 3, 2), dim3u(8, 4, 2), 0, buffer(out, kIndexWords, "out"));
}

void launch_registered(const float* in, float* out, int n) {
  const size_t bytes = (size_t(n) + 1) * sizeof(float);
  const global_registration rin(in, bytes, "in"), rout(out, bytes, "out");
  launch(oob_read_kernel, dim3u(1), dim3u(64), 0, global_ptr<const float>(in),
         global_ptr<float>(out), n);
}

void launch_math(const float* in, float* out, int n) {
  launch(math_kernel, dim3u(uint32_t((n + 63) / 64)), dim3u(64), 0, buffer(in, size_t(n), "in"),
         buffer(out, 6 * size_t(n), "out"), n);
}

void launch_reduce(const float* in, int n, float* out, int blocks) {
  launch(reduce_kernel, dim3u(uint32_t(blocks)), dim3u(kReduceThreads), 0,
         buffer(in, size_t(n), "in"), n, buffer(out, size_t(blocks), "out"));
}

void launch_atomics(float* fsum, int* isum, unsigned* usum, int* imax, int* per_block) {
  launch(atomics_kernel, dim3u(kAtomicBlocks), dim3u(kAtomicThreads), 0, buffer(fsum, 1, "fsum"),
         buffer(isum, 1, "isum"), buffer(usum, 1, "usum"), buffer(imax, 1, "imax"),
         buffer(per_block, 3 * kAtomicBlocks, "per_block"));
}

void launch_atomic_warp(int* out) {
  launch(atomic_warp_kernel, dim3u(1), dim3u(kAtomicWarpThreads), 0,
         buffer(out, kAtomicWarpThreads / 16, "out"));
}

void launch_vec128(const uint32_t* in, uint32_t* out) {
  launch(vec128_kernel, dim3u(1), dim3u(kVecThreads), 0, buffer(in, 4 * kVecThreads, "in"),
         buffer(out, 4 * kVecThreads, "out"));
}

void launch_mma(bool bf16, const uint32_t* a, const uint32_t* b, const float* c, float* d,
                int warps) {
  const size_t lanes = 32 * size_t(warps);
  if (bf16)
    launch(mma_kernel<true>, dim3u(1), dim3u(uint32_t(lanes)), 0, buffer(a, 4 * lanes, "a"),
           buffer(b, 2 * lanes, "b"), buffer(c, 4 * lanes, "c"), buffer(d, 4 * lanes, "d"));
  else
    launch(mma_kernel<false>, dim3u(1), dim3u(uint32_t(lanes)), 0, buffer(a, 4 * lanes, "a"),
           buffer(b, 2 * lanes, "b"), buffer(c, 4 * lanes, "c"), buffer(d, 4 * lanes, "d"));
}

void launch_mma_tf32(const uint32_t* a, const uint32_t* b, const float* c, float* d, int warps) {
  const size_t lanes = 32 * size_t(warps);
  launch(mma_tf32_kernel, dim3u(1), dim3u(uint32_t(lanes)), 0, buffer(a, 4 * lanes, "a"),
         buffer(b, 2 * lanes, "b"), buffer(c, 4 * lanes, "c"), buffer(d, 4 * lanes, "d"));
}

void launch_ldmatrix(const uint16_t* rows, uint32_t* out) {
  launch(ldmatrix_kernel, dim3u(1), dim3u(32), 0, buffer(rows, 32 * 8, "rows"),
         buffer(out, kLdmatrixVariants * 32 * 4, "out"));
}

void launch_cp_async(const uint32_t* in, uint32_t* out) {
  launch(cp_async_kernel, dim3u(1), dim3u(kCpAsyncThreads), 0, buffer(in, kCpAsyncIn, "in"),
         buffer(out, kCpAsyncOut, "out"));
}

void launch_gemm(bool bf16, const uint16_t* a, const uint16_t* b, float* c, int m, int n, int k,
                 bool trailing_barrier, void* stream) {
  const stream_t s = stream_t(stream);
  const dim3u grid(uint32_t((n + kGemmTile - 1) / kGemmTile),
                   uint32_t((m + kGemmTile - 1) / kGemmTile));
  auto ba = buffer(a, size_t(m) * k, "A");
  auto bb = buffer(b, size_t(k) * n, "B");
  auto bc = buffer(c, size_t(m) * n, "C");
  if (!trailing_barrier)
    launch_on(s, gemm_kernel<false, false>, grid, dim3u(kGemmThreads), 0, ba, bb, bc, m, n, k);
  else if (bf16)
    launch_on(s, gemm_kernel<true, true>, grid, dim3u(kGemmThreads), 0, ba, bb, bc, m, n, k);
  else
    launch_on(s, gemm_kernel<false, true>, grid, dim3u(kGemmThreads), 0, ba, bb, bc, m, n, k);
}

void launch_bug_oob(const float* in, float* out, int n) {
  launch(oob_read_kernel, dim3u(2), dim3u(64), 0, buffer(in, size_t(n), "in"),
         buffer(out, size_t(n) + 1, "out"), n);
}

void launch_bug_misaligned(const float* in, float* out) {
  launch(misaligned_kernel, dim3u(1), dim3u(32), 0, buffer(in, 4 * 32 + 4, "in"),
         buffer(out, 32, "out"));
}

void launch_bug_barrier_exit(float* out) {
  launch(barrier_exit_kernel, dim3u(1), dim3u(64), 0, buffer(out, 64, "out"));
}

void launch_bug_barrier_sites(float* out) {
  launch(barrier_sites_kernel, dim3u(1), dim3u(64), 0, buffer(out, 64, "out"));
}

void launch_bug_shfl_half(int* out) {
  launch(shfl_half_kernel, dim3u(1), dim3u(32), 0, buffer(out, 32, "out"));
}

void launch_bug_race(float* out) {
  launch(race_kernel, dim3u(1), dim3u(32), 0, buffer(out, 32, "out"));
}

void launch_bug_cp_async_early(const uint32_t* in, uint32_t* out) {
  launch(cp_async_early_kernel, dim3u(1), dim3u(32), 0, buffer(in, 4 * 32, "in"),
         buffer(out, 32, "out"));
}

void launch_bug_shared_oob(float* out) {
  launch(named(shared_oob_kernel, "shared_oob_kernel (named)"), dim3u(1), dim3u(32), 0,
         buffer(out, 32, "out"));
}

void launch_bug_uninitialized(float* out) {
  launch(uninitialized_kernel, dim3u(1), dim3u(32), 0, buffer(out, 32, "out"));
}

void launch_bug_unregistered(const float* in, float* out, int n) {
  launch(oob_read_kernel, dim3u(1), dim3u(32), 0, global_ptr<const float>(in),
         global_ptr<float>(out), n);
}

void launch_bug_shfl_barrier(int* out) {
  launch(shfl_barrier_kernel, dim3u(1), dim3u(32), 0, buffer(out, 32, "out"));
}

void launch_bug_collective_mismatch(uint32_t* out) {
  launch(collective_mismatch_kernel, dim3u(1), dim3u(32), 0, buffer(out, 32, "out"));
}

void launch_bug_atomics_then_read(int* out) {
  launch(atomics_then_read_kernel, dim3u(1), dim3u(32), 0, buffer(out, 1, "out"));
}

void launch_bug_read_then_atomics(int* out) {
  launch(read_then_atomics_kernel, dim3u(1), dim3u(32), 0, buffer(out, 1, "out"));
}

void launch_bug_write_then_atomics(int* out) {
  launch(write_then_atomics_kernel, dim3u(1), dim3u(32), 0, buffer(out, 1, "out"));
}

void launch_bug_spin_warp(int* out) {
  launch(spin_warp_kernel, dim3u(1), dim3u(32), 0, buffer(out, 32, "out"));
}

void launch_bug_spin_blocks(int* flag) {
  launch(spin_blocks_kernel, dim3u(2), dim3u(32), 0, buffer(flag, 1, "flag"));
}

void launch_bug_packed_views(const float* packed, float* out, int n, int how) {
  if (how == 0) {  // buffer() arguments
    launch(packed_views_kernel, dim3u(1), dim3u(uint32_t(n)), 0, buffer(packed, size_t(n), "q"),
           buffer(packed + n, size_t(n), "k"), buffer(out, size_t(n), "out"), n);
    return;
  }
  const size_t bytes = size_t(n) * sizeof(float);
  const global_registration rq(packed, bytes, "q"), rk(packed + n, bytes, "k"),
      ro(out, bytes, "out");
  if (how == 1)  // pointers made on the host
    launch(packed_views_kernel, dim3u(1), dim3u(uint32_t(n)), 0, global_ptr<const float>(packed),
           global_ptr<const float>(packed + n), global_ptr<float>(out), n);
  else  // raw pointers in a struct, made checked in kernel code
    launch(packed_params_kernel, dim3u(1), dim3u(uint32_t(n)), 0,
           packed_params{packed, packed + n, out, n});
}

void launch_bug_shared_views(float* out) {
  launch(shared_views_kernel, dim3u(1), dim3u(32), 0, buffer(out, 32, "out"));
}

}  // namespace cuda / emulated
}  // namespace tokenmix::simt_selftest
