// Tiling and buffer layout of the CUDA linear-attention scans, shared by the kernels
// (linear_scan_kernels.h) and the op layer that sizes their workspace (scan_entry.h). Plain
// arithmetic: no SIMT or torch types.
#pragma once

#include <cstdint>

#include "tokenmix/host_device.h"
#include "tokenmix/linear_scan_problem.h"

namespace tokenmix::cuda {

inline constexpr int kScanChunk = 64;     // tokens per chunk (as on the CPU)
inline constexpr int kScanKeys = 32;      // key columns per slice
inline constexpr int kScanValues = 32;    // value columns per block
inline constexpr int kScanThreads = 256;  // threads per block
// Per-key gates split a chunk into sub-chunks of 16 tokens (one warp tile's rows): the products
// between different sub-chunks run on tensor cores, those inside one on exact FMAs.
inline constexpr int kScanSub = 16;
inline constexpr int kScanSubChunks = kScanChunk / kScanSub;
// The decays over runs of whole sub-chunks a .. b - 1 (a < b), per key of a slice.
inline constexpr int kScanSpans = kScanSubChunks * (kScanSubChunks + 1) / 2;
inline constexpr int64_t kLinearScanCudaMaxKeyDim = 256;
// Per-key loops of the kernels give each key one thread of the block.
static_assert(kLinearScanCudaMaxKeyDim <= kScanThreads, "one thread per key");

TM_HOST_DEVICE int64_t scan_chunks(int64_t tokens) {
  return (tokens + kScanChunk - 1) / kScanChunk;
}
TM_HOST_DEVICE int64_t scan_key_pad(int64_t key_dim) {
  return (key_dim + kScanKeys - 1) / kScanKeys * kScanKeys;
}
TM_HOST_DEVICE int64_t scan_value_blocks(int64_t value_dim) {
  return (value_dim + kScanValues - 1) / kScanValues;
}

// Slots of the states workspace: sequence n's chunk-start states (chunks + 1 of them, the last
// being the final state) take slots base_n .. base_n + chunks. With cu_seqlens, base_n =
// floor(begin_n / C) + 2n needs no host copy of the offsets and never overlaps the next sequence
// (floor((begin + len) / C) - floor(begin / C) + 2 >= ceil(len / C) + 1).
TM_HOST_DEVICE int64_t scan_state_slots(int64_t seq_len, int64_t num_seqs, bool varlen) {
  return varlen ? seq_len / kScanChunk + 2 * num_seqs + 1 : num_seqs * (scan_chunks(seq_len) + 1);
}
TM_HOST_DEVICE int64_t scan_state_base(int64_t seq_len, int64_t n, int64_t begin, bool varlen) {
  return varlen ? begin / kScanChunk + 2 * n : n * (scan_chunks(seq_len) + 1);
}

// Floats of shared memory per block of the delta rule's kernels (the layout of DeltaSmem in
// delta_rule_kernels.h).
TM_HOST_DEVICE int64_t delta_smem_floats(int64_t key_pad, bool backward) {
  constexpr int64_t C = kScanChunk, BK = kScanKeys, BV = kScanValues;
  const int64_t common = key_pad * BV + 3 * C * BV + 2 * C * C + 2 * C * BK + 4 * C;
  return common + (backward ? 2 * C * BV + 2 * C * C + BK * BV + 5 * C + kScanThreads : 0);
}

// Floats of shared memory per block of the linear scans' kernels (ScanSmem).
TM_HOST_DEVICE int64_t scan_smem_floats(int64_t key_pad, bool backward) {
  constexpr int64_t C = kScanChunk, BK = kScanKeys, BV = kScanValues;
  const int64_t common = key_pad * BV + C * BV + C * C + 5 * C * BK + BK + C + kScanSpans * BK;
  return common + (backward ? BK * BV + C * BV + C * C : 0);
}

// The backward's float32 workspace, in this order: the chunk-start states [slots, H,
// value_blocks, key_pad, BV], the value blocks' shares of dq and of dk [value_blocks, B, T, H, K]
// each, then for a decayed linear scan the final state's shares of dL/dG [value_blocks, N, H, K],
// for the delta rule the shares of each token's dL/dG and dL/dbeta [value_blocks, B, T, H] each.
struct ScanWorkspace {
  int64_t states, dq_part, dk_part, extra, total;  // offsets and size, in floats
};
TM_HOST_DEVICE ScanWorkspace scan_workspace(const LinearScanProblem& p) {
  const int64_t vb = scan_value_blocks(p.value_dim);
  const int64_t plane = p.batch * p.seq_len * p.heads * p.key_dim;
  ScanWorkspace w;
  w.states = 0;
  w.dq_part = scan_state_slots(p.seq_len, p.num_seqs, p.cu_seqlens != nullptr) * p.heads * vb *
              scan_key_pad(p.key_dim) * kScanValues;
  w.dk_part = w.dq_part + vb * plane;
  w.extra = w.dk_part + vb * plane;
  const int64_t extra = p.delta_rule                  ? 2 * vb * p.batch * p.seq_len * p.heads
                        : p.decay != DecayKind::kNone ? vb * p.num_seqs * p.heads * p.key_dim
                                                      : 0;
  w.total = w.extra + extra;
  return w;
}

}  // namespace tokenmix::cuda
