// The per-tile tables the CPU attention engine shares with its policies: where
// each lane's rows live (LaneTable) and which key/value rows a chunk holds
// (ChunkRows). A policy derives its own lane and chunk types from these and
// adds what its element rule needs.
#pragma once

#include <cstdint>

#include "tokenmix/cpu/simd.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

// The tensors of one attention call, as the engine addresses them: element
// offsets per lane come from the policy (LaneTable), so the views' layouts are
// the policy's business.
struct AttentionTensors {
  const void* q = nullptr;
  void* out = nullptr;
  void* lse = nullptr;  // fp32 (fp64 for fp64 problems), natural log
  // Backward only.
  const void* out_in = nullptr;  // the forward's output
  const void* grad_out = nullptr;
  void* grad_q = nullptr;
  const void* grad_lse = nullptr;  // optional, indexed like lse
  int head_dim = 0, value_dim = 0;
  double scale = 1.0;
};

// The tensors of an attention problem (NeighborhoodProblem, BlockSparseProblem: the same
// field names) as the engine addresses them.
template <class Problem>
AttentionTensors attention_tensors(const Problem& p) {
  AttentionTensors io;
  io.q = p.q.data;
  io.out = p.out.data;
  io.lse = p.lse;
  io.out_in = p.out.data;
  io.grad_out = p.grad_out.data;
  io.grad_q = p.grad_q.data;
  io.grad_lse = p.grad_lse;
  io.head_dim = int(p.head_dim);
  io.value_dim = int(p.value_dim);
  io.scale = p.scale;
  return io;
}

// Lane l of a tile is one query row of one head. head[l] < 0 marks a padding
// lane (no query): it computes harmless values that are never written.
template <class T>
struct LaneTable {
  using I = typename Simd<T>::I;
  Buffer<int> head;
  Buffer<int64_t> q_off, out_off, grad_out_off, grad_q_off, lse_off;  // in elements
  Buffer<I> alive;               // backward: -1 where the row has a key (LSE > -inf), else 0
  Buffer<uint8_t> q_bad, g_bad;  // backward: the lane's Q (dO) row holds an inf or NaN
  bool any_q_bad = false, any_g_bad = false;
  Buffer<I> nan_logit;  // exact forward: -1 once a kept logit of the lane was NaN

  void init(int lanes) {
    head.assign(size_t(lanes), -1);
    q_off.assign(size_t(lanes), 0);
    out_off.assign(size_t(lanes), 0);
    grad_out_off.assign(size_t(lanes), 0);
    grad_q_off.assign(size_t(lanes), 0);
    lse_off.assign(size_t(lanes), 0);
    alive.assign(size_t(lanes), 0);
    q_bad.assign(size_t(lanes), 0);
    g_bad.assign(size_t(lanes), 0);
    nan_logit.assign(size_t(lanes), 0);
  }
};

// Up to `capacity` keys of a tile, as row pointers into K and V (read in
// place) and, in the backward, into the dK/dV accumulators. A *full* chunk
// keeps every (active lane, key) element: the engine does no mask work on it.
template <class T>
struct ChunkRows {
  Buffer<const T*> krow, vrow;
  Buffer<T*> gk, gv;
  Buffer<uint8_t> bad;  // exact passes: the column's K or V row holds an inf or NaN
  int n = 0;
  bool full = false;

  void init(int capacity, bool backward) {
    krow.assign(size_t(capacity), nullptr);
    vrow.assign(size_t(capacity), nullptr);
    bad.assign(size_t(capacity), 0);
    if (backward) {
      gk.assign(size_t(capacity), nullptr);
      gv.assign(size_t(capacity), nullptr);
    }
  }
};

}  // namespace tokenmix::cpu::TOKENMIX_ISA
