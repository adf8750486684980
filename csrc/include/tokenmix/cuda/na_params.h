// Kernel parameters of the CUDA neighborhood-attention engine: plain data passed by value to every
// kernel, built on the host from a NeighborhoodProblem (na_launch.h). The same struct serves the
// GPU build (nvcc) and the emulated build (host compiler).
#pragma once

#include <cstdint>

#include "tokenmix/neighborhood_schedule.h"

namespace tokenmix::cuda {

// Queries per tile (a box of the schedule's tile shape) and threads per block: 4 warps, each
// owning 16 rows of the tile (the M side of the m16n8k16 tensor-core instruction).
constexpr int kTileRows = 64;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Output columns a backward block accumulates in registers (dQ, dK, dV are split in chunks).
constexpr int kGradChunk = 64;

struct NaParams {
  NeighborhoodSchedule sched;  // query tiles; the backward uses the same shape for key tiles
  int batch, heads, kv_heads;
  int head_dim, value_dim;     // D, Dv
  int head_dim_padded;         // D rounded up to the kernel's k-step (16 for tensor cores)
  int value_dim_padded;        // Dv rounded up to 16
  int num_extra;               // additional key/value tokens
  int tokens;                  // S0 * S1 * S2
  int64_t tiles_per_head;      // sched.tiles_per_head()
  int64_t key_tiles_per_head;  // spatial key tiles (backward), = tiles_per_head
  int extra_tiles;             // tiles of additional tokens (backward key tiles)
  float scale;                 // softmax scale
  float scale_log2;            // scale * log2(e): logits are kept in log2 units
  // Element strides of [B, S0, S1, S2, H] views (the feature stride is 1).
  int64_t q_st[5], k_st[5], v_st[5], o_st[5], go_st[5];
  int64_t ek_st[3], ev_st[3];  // [B, N, H_kv]
  const void* q;
  const void* k;
  const void* v;
  const void* extra_k;
  const void* extra_v;
  const void* rpb;  // [H, 2k0-1, 2k1-1, 2k2-1], element dtype, or null
  int rpb_dims[3];
  int rpb_size;
  // Forward outputs.
  void* out;
  float* lse;  // [B, tokens, H]
  // Backward inputs and outputs.
  const void* grad_out;
  const void* out_in;       // the forward output (for delta = rowsum(dO * O))
  const float* lse_in;      // the forward LSE
  const float* grad_lse;    // optional
  float* delta;             // workspace [B, tokens, H]: rowsum(dO * O) - grad_lse
  void* grad_q;             // contiguous [B, S.., H, D]
  void* grad_k;             // contiguous [B, S.., H_kv, D]
  void* grad_v;             // contiguous [B, S.., H_kv, Dv]
  void* grad_extra_k;       // contiguous [B, N, H_kv, D]
  void* grad_extra_v;       // contiguous [B, N, H_kv, Dv]
  float* grad_rpb;          // [H, rpb_size] fp32, zeroed before the backward
  float* grad_rpb_partial;  // deterministic mode: [B, H, tiles_per_head, rpb_size], zeroed
  bool deterministic;
};

}  // namespace tokenmix::cuda
