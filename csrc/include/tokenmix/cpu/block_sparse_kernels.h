// The block-sparse attention kernels of the CPU engine: the forward deals the
// tiles of BlockSparsePolicy to the threads; the backward's dK/dV schedule is
// the slice plan below.
#pragma once

#include <atomic>
#include <cstdint>

#include "tokenmix/block_sparse_problem.h"
#include "tokenmix/cpu/attention_engine.h"
#include "tokenmix/cpu/block_sparse_policy.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

// Every tile writes its own rows, so any order is correct. Work per query block
// is uneven (causal and windowed layouts) and so is the machine (a shared host
// takes a thread away for milliseconds at a time), so the threads take query
// blocks one at a time from a shared counter rather than a fixed share each;
// a query block's tiles stay together (they read the same K/V rows), and
// consecutive blocks share a head's K/V.
template <class In, class T>
void block_sparse_forward(const BlockSparseProblem& p) {
  using Policy = BlockSparsePolicy<In, T>;
  const Policy pol(p, false);
  const AttentionEngine<Policy> eng(pol);
  const int64_t per_block = pol.tiles_per_block;
  const int64_t blocks = pol.num_tiles() / per_block;
  const int64_t workers = min_of<int64_t>(blocks, int64_t(max_of(1, p.num_threads)));
  std::atomic<int64_t> next{0};
  run_parallel(p, workers, 1, [&](int64_t, int64_t) {
    typename AttentionEngine<Policy>::Work w;
    eng.init_work(w, false);
    BlockSparseTile tile;
    for (int64_t blk = next.fetch_add(1, std::memory_order_relaxed); blk < blocks;
         blk = next.fetch_add(1, std::memory_order_relaxed))
      for (int64_t s = 0; s < per_block; ++s)
        if (pol.tile(blk * per_block + s, &tile)) eng.forward_tile(w, tile);
  });
}

// ---------------------------------------------------------- backward schedule --
//
// The backward is one pass per tile (P recomputed from the LSE, five GEMMs per
// chunk): dQ of the tile's rows is complete when the tile ends and is written
// directly; dK/dV are added into fp32 (fp64) accumulator rows. The tiles of one
// (batch, kv head) pair, in their fixed order, are cut into `slices`
// contiguous runs of about equal work (kv blocks visited); each (pair, slice)
// is one task that owns its accumulator [kv_len, padded dim], so no two tasks
// ever add to the same row and nothing is locked. The final pass sums a key's
// slices in slice order. Slices depend on the problem only (pairs and layout),
// never on the thread count, and each task adds in tile order, so the
// gradients are the same bit for bit at any thread count. With at least
// kTasks pairs there is one slice per pair (accumulators: K + V in fp32);
// fewer pairs get ceil(kTasks / pairs) slices, at most kMaxSlices, so the
// accumulators never exceed max(1, kTasks / pairs) times K + V in fp32 and
// nothing grows with the thread count or with Tq x Tk.
struct BlockSparseSlices {
  static constexpr int64_t kTasks = 8, kMaxSlices = 4;
  int64_t slices = 1;
  Buffer<int64_t> bounds;  // [pairs, slices + 1]: first tile (pair-local index) of each slice
};

template <class Policy>
void plan_slices(const Policy& pol, int64_t pairs, int64_t per_pair, BlockSparseSlices& plan) {
  const BlockSparseProblem& p = pol.problem();
  plan.slices =
      min_of<int64_t>(per_pair, min_of<int64_t>(BlockSparseSlices::kMaxSlices,
                                                (BlockSparseSlices::kTasks + pairs - 1) / pairs));
  plan.slices = max_of<int64_t>(plan.slices, 1);
  const int64_t S = plan.slices;
  plan.bounds.assign(size_t(pairs * (S + 1)), 0);
  const int64_t per_unit = pol.tiles_per_unit();
  const int64_t units_per_pair = pol.units / p.kv_heads;
  run_parallel(p, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / p.kv_heads, hk = pair % p.kv_heads;
      const int64_t first = (b * pol.units + hk * units_per_pair) * per_unit;
      auto work = [&](int64_t i) {
        BlockSparseTile t;
        return pol.tile(first + i, &t) ? 1 + pol.tile_blocks(t) : 0;
      };
      int64_t total = 0;
      for (int64_t i = 0; i < per_pair; ++i) total += work(i);
      int64_t* bd = plan.bounds.data() + pair * (S + 1);
      bd[S] = per_pair;
      int64_t cum = 0, s = 1;
      for (int64_t i = 0; i < per_pair && s < S; ++i) {
        cum += work(i);
        while (s < S && cum * S >= total * s) bd[s++] = i + 1;
      }
      while (s < S) bd[s++] = per_pair;
    }
  });
}

template <class In, class T>
void block_sparse_backward(const BlockSparseProblem& p) {
  using Policy = BlockSparsePolicy<In, T>;
  const Policy pol(p, true);
  const AttentionEngine<Policy> eng(pol);
  const int64_t Hkv = p.kv_heads, Tk = p.kv_len, D = p.head_dim, Dv = p.value_dim;
  const int64_t pairs = p.batch * Hkv, dp = pol.dp, dvp = pol.dvp;
  const int64_t per_unit = pol.tiles_per_unit();
  const int64_t units_per_pair = pol.units / Hkv;
  const int64_t per_pair = units_per_pair * per_unit;

  BlockSparseSlices plan;
  plan_slices(pol, pairs, per_pair, plan);
  const int64_t S = plan.slices;

  Buffer<T> acc_k, acc_v;
  acc_k.allocate(size_t(pairs * S * Tk * dp), /*large=*/true);
  acc_v.allocate(size_t(pairs * S * Tk * dvp), /*large=*/true);
  run_parallel(p, pairs * S * Tk, 256, [&](int64_t begin, int64_t end) {
    fill(acc_k.data() + begin * dp, acc_k.data() + end * dp, T(0));
    fill(acc_v.data() + begin * dvp, acc_v.data() + end * dvp, T(0));
  });

  run_parallel(p, pairs * S, 1, [&](int64_t begin, int64_t end) {
    typename AttentionEngine<Policy>::Work w;
    eng.init_work(w, true);
    BlockSparseTile tile;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / S, slice = task % S;
      const int64_t b = pair / Hkv, hk = pair % Hkv;
      const int64_t first = (b * pol.units + hk * units_per_pair) * per_unit;
      KeyGradRows<T> target;
      target.k = acc_k.data() + task * Tk * dp;
      target.v = acc_v.data() + task * Tk * dvp;
      target.k_ld = dp;
      target.v_ld = dvp;
      const int64_t* bd = plan.bounds.data() + pair * (S + 1);
      for (int64_t i = bd[slice]; i < bd[slice + 1]; ++i)
        if (pol.tile(first + i, &tile)) eng.backward_tile(w, tile, target);
    }
  });

  // dK was accumulated against the log2-scaled query, hence the factor ln 2.
  const T kscale = T(kLn2);
  run_parallel(p, pairs * Tk, 64, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t pair = idx / Tk, t = idx % Tk;
      const int64_t b = pair / Hkv, hk = pair % Hkv;
      In* dk = static_cast<In*>(p.grad_k.data) + p.grad_k.offset(b, t, hk);
      In* dv = static_cast<In*>(p.grad_v.data) + p.grad_v.offset(b, t, hk);
      const T* rk = acc_k.data() + (pair * S * Tk + t) * dp;
      const T* rv = acc_v.data() + (pair * S * Tk + t) * dvp;
      for (int64_t d = 0; d < D; ++d) {
        T sum = rk[d];
        for (int64_t s = 1; s < S; ++s) sum += rk[s * Tk * dp + d];
        dk[d] = from_float<In>(sum * kscale);
      }
      for (int64_t d = 0; d < Dv; ++d) {
        T sum = rv[d];
        for (int64_t s = 1; s < S; ++s) sum += rv[s * Tk * dvp + d];
        dv[d] = from_float<In>(sum);
      }
    }
  });
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
