// Host entry points of the SIMT self-test kernels (selftest_kernels.cu). Pointers are device
// pointers under CUDA and host pointers under the emulator.
#pragma once

#include <cstdint>

namespace tokenmix::simt_selftest {
// The same sources are compiled for the GPU (nvcc) and for the emulator (host
// compiler), sometimes into one library: the inline namespace keeps the two
// sets of entry points apart.
#if defined(__CUDACC__)
inline namespace cuda {
#else
inline namespace emulated {
#endif

constexpr int kShuffleThreads = 64, kShuffleResults = 8;
constexpr int kVoteThreads = 64, kVoteResults = 6;
constexpr int kReduceThreads = 256;
constexpr int kAtomicBlocks = 4, kAtomicThreads = 128;
constexpr int kAtomicWarpThreads = 64;
constexpr int kVecThreads = 128;
constexpr int kLdmatrixVariants = 6;  // x1, x2, x4, x1.trans, x2.trans, x4.trans
constexpr int kCpAsyncThreads = 64, kCpAsyncIn = 704, kCpAsyncOut = 768;
// The GEMM needs K % 8 == 0 and N % 8 == 0 (16-byte cp.async chunks); M is free.
constexpr int kGemmTile = 64;

// out_i: kShuffleResults x 64, out_f and out_u: 64.
void launch_shuffles(int* out_i, float* out_f, unsigned* out_u);
// out: kVoteResults x 64.
void launch_votes(uint32_t* out);
// 6 results (exp2f_approx, expf_approx, log2f_approx, rcp, rsqrt, exp2f_ftz) per input.
void launch_math(const float* in, float* out, int n);
void launch_reduce(const float* in, int n, float* out, int blocks);
// per_block: 3 ints per block.
void launch_atomics(float* fsum, int* isum, unsigned* usum, int* imax, int* per_block);
// out: 2 ints per warp (after the first and the second round of atomics).
void launch_atomic_warp(int* out);
void launch_vec128(const uint32_t* in, uint32_t* out);  // 4 * kVecThreads words each
// One m16n8k16 problem per warp: a 32x4, b 32x2, c and d 32x4 words/floats per warp (fragments).
void launch_mma(bool bf16, const uint32_t* a, const uint32_t* b, const float* c, float* d,
                int warps);
// tf32: a, b hold float32 patterns (4 and 2 per lane), rounded by the kernel (f32_to_tf32_bits).
void launch_mma_tf32(const uint32_t* a, const uint32_t* b, const float* c, float* d, int warps);
// rows: 32 rows of 8 halves; out: kLdmatrixVariants x 32 lanes x 4 registers.
void launch_ldmatrix(const uint16_t* rows, uint32_t* out);
void launch_cp_async(const uint32_t* in, uint32_t* out);
// C[M x N] (f32) = A[M x K] * B[K x N], A and B row major f16 or bf16 bit patterns.
// stream: a cudaStream_t under CUDA (nullptr: the default stream); ignored by the emulator.
void launch_gemm(bool bf16, const uint16_t* a, const uint16_t* b, float* c, int m, int n, int k,
                 bool trailing_barrier = true, void* stream = nullptr);
void launch_warp_exchange(uint32_t* out, bool with_sync_warp);  // 64 words
// Block (8,4,2), grid (2,3,2): 4 words per thread (thread idx, block idx, lane | warp << 8,
// linear).
constexpr int kIndexWords = 4 * 64 * 12;
void launch_indices(uint32_t* out);
// in and out hold n + 1 floats, registered with global_registration (no buffer() arguments).
void launch_registered(const float* in, float* out, int n);

// Planted bugs: each launch must be reported by the emulator.
void launch_bug_oob(const float* in, float* out, int n);
void launch_bug_misaligned(const float* in, float* out);
void launch_bug_barrier_exit(float* out);
void launch_bug_barrier_sites(float* out);
void launch_bug_shfl_half(int* out);
void launch_bug_race(float* out);
void launch_bug_cp_async_early(const uint32_t* in, uint32_t* out);
void launch_bug_shared_oob(float* out);
void launch_bug_uninitialized(float* out);
void launch_bug_unregistered(const float* in, float* out, int n);
void launch_bug_shfl_barrier(int* out);
void launch_bug_collective_mismatch(uint32_t* out);
void launch_bug_atomics_then_read(int* out);
void launch_bug_read_then_atomics(int* out);
void launch_bug_write_then_atomics(int* out);
void launch_bug_spin_warp(int* out);  // 32 ints
void launch_bug_spin_blocks(int* flag);
// packed: 2n floats (q, then k), out: n floats. how: 0 buffer() arguments, 1 global_ptr arguments
// made on the host, 2 raw pointers in a struct.
void launch_bug_packed_views(const float* packed, float* out, int n, int how);
void launch_bug_shared_views(float* out);

}  // namespace cuda / emulated
}  // namespace tokenmix::simt_selftest
