// Kernel parameters of the neighborhood-attention policy of the CUDA attention engine: plain data
// passed by value to every kernel, built on the host from a NeighborhoodProblem (na_launch.h). The
// same struct serves the GPU build (nvcc) and the emulated build (host compiler).
#pragma once

#include <cstdint>

#include "tokenmix/cuda/attention_params.h"
#include "tokenmix/neighborhood_schedule.h"

namespace tokenmix::cuda {

struct NaParams : AttentionParams {
  NeighborhoodSchedule sched;  // query tiles; the backward uses the same shape for key tiles
  int num_extra;               // additional key/value tokens
  int tokens;                  // S0 * S1 * S2
  int64_t tiles_per_head;      // sched.tiles_per_head()
  int64_t key_tiles_per_head;  // spatial key tiles (backward), = tiles_per_head
  int extra_tiles;             // tiles of additional tokens (backward key tiles)
  // Element strides of [B, S0, S1, S2, H] views (the feature stride is 1).
  int64_t q_st[5], k_st[5], v_st[5], o_st[5], go_st[5];
  int64_t ek_st[3], ev_st[3];  // [B, N, H_kv]
  const void* extra_k;
  const void* extra_v;
  const void* rpb;  // [H, 2k0-1, 2k1-1, 2k2-1], element dtype, or null
  int rpb_dims[3];
  int rpb_size;
  void* grad_extra_k;       // contiguous [B, N, H_kv, D]
  void* grad_extra_v;       // contiguous [B, N, H_kv, Dv]
  float* grad_rpb;          // [H, rpb_size] fp32, zeroed before the backward
  float* grad_rpb_partial;  // deterministic mode: [B, H, tiles_per_head, rpb_size], zeroed
};

}  // namespace tokenmix::cuda
