// Host side of the block-sparse kernels of the CUDA attention engine: BlockSparseProblem ->
// BsParams, the schedule plans and the workspace, instantiation choice and launches. Included by
// the per-dtype instantiation files (csrc/block_sparse/cuda/), which nvcc compiles for the GPU and
// the host compiler compiles for the SIMT emulator.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "tokenmix/block_sparse_problem.h"
#include "tokenmix/cuda/attention_engine.h"
#include "tokenmix/cuda/block_sparse_policy.h"
#include "tokenmix/cuda/bs_entry.h"
#include "tokenmix/cuda/launch_common.h"

namespace tokenmix::cuda {

// The block-sparse kernels: the engine's bodies with BlockSparsePolicy, and the schedule kernel.
// kUse only separates the instantiations of the forward (0), dQ (1) and dK/dV (2) schedules, so
// that every translation unit owns the kernels it launches.
template <class E, int kUse>
TM_GLOBAL void bs_schedule_kernel(BsScheduleParams s) {
  bs_schedule(s);
}
template <class E, int kDim>
TM_GLOBAL void bs_forward_kernel(BsParams p) {
  attention_forward<BlockSparsePolicy, E, kDim>(p);
}
template <class E>
TM_GLOBAL void bs_backward_delta_kernel(BsParams p) {
  attention_delta<BlockSparsePolicy, E>(p);
}
template <class E, int kDim>
TM_GLOBAL void bs_backward_dq_kernel(BsParams p) {
  attention_dq<BlockSparsePolicy, E, kDim>(p);
}
template <class E, int kDim>
TM_GLOBAL void bs_backward_dkdv_kernel(BsParams p) {
  attention_dkdv<BlockSparsePolicy, E, kDim>(p);
}

namespace bs_host {

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Most blocks of `block` tokens (blocks start at multiples of it) that a span of `span` tokens
// starting at a multiple of `span` overlaps, at most `limit`, at least 1.
inline int64_t blocks_per_span(int64_t span, int64_t block, int64_t limit) {
  const int64_t n = block % span == 0 || span % block == 0 ? ceil_div(span, block)
                                                           : ceil_div(span - 1, block) + 1;
  return std::max<int64_t>(1, std::min(n, limit));
}

// One side's schedule: tiles of kTileRows along `row_len`, chunks of `chunk` along `col_len`.
// Direct: the side's block size is a multiple of the tile and the other's of the chunk, so the
// kernels walk the layout's lists (`per` chunks per block) and there is no schedule. With
// bitmasks, blocks larger than the tile or the chunk take the schedule, which drops the tile x
// chunk pieces whose bits keep nothing and makes those whose bits keep everything full.
struct SidePlan {
  int64_t head_rows = 0, tiles = 0, num_chunks = 0, rows = 1, cols = 1, max = 0;
  bool direct = false;
  int per = 1;
  int64_t words() const { return direct ? 0 : head_rows * tiles * (1 + max + max * rows * cols); }
};

inline SidePlan side_plan(int64_t head_rows, int64_t row_len, int64_t col_len, int64_t row_block,
                          int64_t col_block, int64_t num_row_blocks, int64_t num_col_blocks,
                          int64_t listed, int64_t chunk, bool bits) {
  SidePlan s;
  s.head_rows = head_rows;
  s.tiles = ceil_div(row_len, kTileRows);
  s.num_chunks = ceil_div(col_len, chunk);
  s.rows = blocks_per_span(kTileRows, row_block, num_row_blocks);
  s.cols = blocks_per_span(chunk, col_block, num_col_blocks);
  // Each listed block overlaps at most this many chunks, and a chunk appears once.
  const int64_t per_block = blocks_per_span(col_block, chunk, std::max<int64_t>(s.num_chunks, 1));
  s.max = std::min(s.num_chunks, s.rows * listed * per_block);
  const bool larger = row_block > kTileRows || col_block > chunk;
  if (row_block % kTileRows == 0 && col_block % chunk == 0 && !(bits && larger)) {
    s.direct = true;
    s.per = int(col_block / chunk);
    s.rows = s.cols = 1;
  }
  return s;
}

template <class E>
SidePlan query_side(const BlockSparseProblem& p) {
  const BlockLayoutView& l = p.layout;
  return side_plan(l.batch * l.heads, p.q_len, p.kv_len, l.q_block, l.kv_block, l.num_q_blocks,
                   l.num_kv_blocks, l.max_partial + l.max_full, E::kKeys, l.mask.bits != nullptr);
}
template <class E>
SidePlan key_side(const BlockSparseProblem& p) {
  const BlockLayoutView& l = p.layout;
  return side_plan(l.batch * l.heads, p.kv_len, p.q_len, l.kv_block, l.q_block, l.num_kv_blocks,
                   l.num_q_blocks, l.max_q_partial + l.max_q_full, E::kKeys,
                   l.mask.bits != nullptr);
}

template <class E>
int64_t workspace_words(const BlockSparseProblem& p, bool backward) {
  int64_t words = query_side<E>(p).words();
  if (backward) words += p.batch * p.q_len * p.heads + key_side<E>(p).words();
  return words;
}

inline BsSchedule schedule_at(int32_t* base, const SidePlan& s) {
  const int64_t n = s.head_rows * s.tiles;
  BsSchedule r;
  r.count = base;
  r.entry = base + n;
  r.table = base + n + n * s.max;
  r.max = int(s.max);
  r.rows = int(s.rows);
  r.cols = int(s.cols);
  return r;
}

inline void copy_strides(int64_t* st, const TokenView& v) {
  st[0] = v.batch_stride;
  st[1] = v.token_stride;
  st[2] = v.head_stride;
}

// Elements spanned by a [B, T, H, cols] view.
inline size_t view_span(const TokenView& v, int64_t batch, int64_t tokens, int64_t heads,
                        int64_t cols) {
  return size_t((batch - 1) * v.batch_stride + (tokens - 1) * v.token_stride +
                (heads - 1) * v.head_stride + cols);
}

template <class E>
BsParams make_params(const BlockSparseProblem& p) {
  BsParams k{};
  k.batch = int(p.batch);
  k.heads = int(p.heads);
  k.kv_heads = int(p.kv_heads);
  k.head_dim = int(p.head_dim);
  k.value_dim = int(p.value_dim);
  k.head_dim_padded = round_up_to(k.head_dim, E::kStep);
  k.value_dim_padded = round_up_to(k.value_dim, E::kStep);
  k.scale = float(p.scale);
  k.scale_log2 = float(p.scale) * kLog2e;
  k.q = p.q.data;
  k.k = p.k.data;
  k.v = p.v.data;
  k.out = p.out.data;
  k.lse = static_cast<float*>(p.lse);
  k.grad_out = p.grad_out.data;
  k.out_in = p.out.data;
  k.lse_in = static_cast<const float*>(p.lse);
  k.grad_lse = static_cast<const float*>(p.grad_lse);
  k.grad_q = p.grad_q.data;
  k.grad_k = p.grad_k.data;
  k.grad_v = p.grad_v.data;
  k.deterministic = p.deterministic;
  k.q_len = p.q_len;
  k.kv_len = p.kv_len;
  copy_strides(k.q_st, p.q);
  copy_strides(k.k_st, p.k);
  copy_strides(k.v_st, p.v);
  copy_strides(k.o_st, p.out);
  copy_strides(k.go_st, p.grad_out);
  k.layout = p.layout;
  k.q_tiles = int(ceil_div(p.q_len, kTileRows));
  k.key_tiles = int(ceil_div(p.kv_len, kTileRows));
  return k;
}

// Schedule-kernel parameters of one side.
inline BsScheduleParams schedule_params(const SidePlan& s, const BsSchedule& out, int64_t row_len,
                                        int64_t col_len, int row_block, int col_block,
                                        int num_row_blocks, int chunk) {
  BsScheduleParams k{};
  k.row_len = row_len;
  k.col_len = col_len;
  k.row_block = row_block;
  k.col_block = col_block;
  k.num_row_blocks = num_row_blocks;
  k.tiles = int(s.tiles);
  k.chunk_len = chunk;
  k.num_chunks = int(s.num_chunks);
  k.head_rows = s.head_rows;
  k.count = const_cast<int32_t*>(out.count);
  k.entry = const_cast<int32_t*>(out.entry);
  k.table = const_cast<int32_t*>(out.table);
  k.max = out.max;
  k.rows = out.rows;
  k.cols = out.cols;
  return k;
}

template <class E>
BsScheduleParams query_schedule_params(const BlockSparseProblem& p, const SidePlan& s,
                                       const BsSchedule& out) {
  const BlockLayoutView& l = p.layout;
  BsScheduleParams k =
      schedule_params(s, out, p.q_len, p.kv_len, l.q_block, l.kv_block, l.num_q_blocks, E::kKeys);
  k.pcount = l.partial_count;
  k.pindex = l.partial_index;
  k.pslot = nullptr;
  k.fcount = l.full_count;
  k.findex = l.full_index;
  k.maxp = l.max_partial;
  k.maxf = l.max_full;
  k.layout = l;
  k.key_rows = false;
  return k;
}

template <class E>
BsScheduleParams key_schedule_params(const BlockSparseProblem& p, const SidePlan& s,
                                     const BsSchedule& out) {
  const BlockLayoutView& l = p.layout;
  BsScheduleParams k =
      schedule_params(s, out, p.kv_len, p.q_len, l.kv_block, l.q_block, l.num_kv_blocks, E::kKeys);
  k.pcount = l.q_partial_count;
  k.pindex = l.q_partial_index;
  k.pslot = l.q_partial_slot;
  k.fcount = l.q_full_count;
  k.findex = l.q_full_index;
  k.maxp = l.max_q_partial;
  k.maxf = l.max_q_full;
  k.layout = l;
  k.key_rows = true;
  return k;
}

// The layout's tensors (for the emulator's bounds checks).
inline void register_layout(Registrations& r, const BlockSparseProblem& p, bool backward) {
  const BlockLayoutView& l = p.layout;
  const int64_t hr = l.batch * l.heads, nq = l.num_q_blocks, nk = l.num_kv_blocks;
  r.add(l.partial_count, size_t(hr * nq) * 4, "kv_num_blocks");
  r.add(l.partial_index, size_t(hr * nq * l.max_partial) * 4, "kv_indices");
  r.add(l.full_count, size_t(hr * nq) * 4, "full_kv_num_blocks");
  r.add(l.full_index, size_t(hr * nq * l.max_full) * 4, "full_kv_indices");
  if (l.mask.bits)
    r.add(l.mask.bits, size_t(hr * nq * l.max_partial * l.q_block * l.mask.words) * 4, "mask_bits");
  if (l.mask.q_doc) {
    r.add(l.mask.q_doc, size_t(l.mask.doc_batch * p.q_len) * 4, "q_doc");
    r.add(l.mask.kv_doc, size_t(l.mask.doc_batch * p.kv_len) * 4, "kv_doc");
  }
  if (!backward) return;
  r.add(l.q_partial_count, size_t(hr * nk) * 4, "q_num_blocks");
  r.add(l.q_partial_index, size_t(hr * nk * l.max_q_partial) * 4, "q_indices");
  r.add(l.q_partial_slot, size_t(hr * nk * l.max_q_partial) * 4, "q_slots");
  r.add(l.q_full_count, size_t(hr * nk) * 4, "full_q_num_blocks");
  r.add(l.q_full_index, size_t(hr * nk * l.max_q_full) * 4, "full_q_indices");
}

template <class E>
void register_inputs(Registrations& r, const BlockSparseProblem& p) {
  using T = typename E::T;
  r.add(p.q.data, view_span(p.q, p.batch, p.q_len, p.heads, p.head_dim) * sizeof(T), "q");
  r.add(p.k.data, view_span(p.k, p.batch, p.kv_len, p.kv_heads, p.head_dim) * sizeof(T), "k");
  r.add(p.v.data, view_span(p.v, p.batch, p.kv_len, p.kv_heads, p.value_dim) * sizeof(T), "v");
}

template <class K>
void launch_schedule(K kernel, const char* name, const BsScheduleParams& s,
                     const device_facts& device, stream_t stream) {
  const int64_t grid = s.head_rows * s.tiles;
  if (grid == 0) return;
  const int64_t bytes = bs_schedule_smem(s.num_chunks);
  prepare_shared(kernel, bytes, device, name);
  launch_on(stream, named(kernel, name), dim3u(uint32_t(grid)), dim3u(kThreads), size_t(bytes), s);
  check_launch(name);
}

template <class E, int kDim>
void forward_with(const BlockSparseProblem& p, int32_t* workspace, stream_t stream) {
  using T = typename E::T;
  using Tile = BlockSparsePolicy::QueryTile<E>;
  BsParams prm = make_params<E>(p);
  const SidePlan qside = query_side<E>(p);
  prm.qs = schedule_at(workspace, qside);
  prm.direct_q = qside.direct;
  prm.q_per = qside.per;
  constexpr int kVChunk = kDim > 0 ? kDim : 64;
  const QueryMajorSmem L = query_major_smem<E>(prm.head_dim_padded, kVChunk, false, false,
                                               Tile::row_ints(prm), Tile::key_ints(prm));
  auto kernel = bs_forward_kernel<E, kDim>;
  const device_facts device = checked_device();
  prepare_shared(kernel, L.bytes, device, "bs_forward_kernel");
  Registrations r;
  register_inputs<E>(r, p);
  register_layout(r, p, false);
  r.add(workspace, size_t(qside.words()) * 4, "schedule (workspace)");
  r.add(p.out.data, view_span(p.out, p.batch, p.q_len, p.heads, p.value_dim) * sizeof(T), "out");
  r.add(p.lse, size_t(p.batch * p.q_len * p.heads) * sizeof(float), "lse");
  r.commit();
  if (!qside.direct)
    launch_schedule(bs_schedule_kernel<E, 0>, "bs_schedule_kernel",
                    query_schedule_params<E>(p, qside, prm.qs), device, stream);
  const dim3u grid(uint32_t(prm.batch * prm.heads * prm.q_tiles),
                   uint32_t((prm.value_dim + kVChunk - 1) / kVChunk));
  launch_on(stream, named(kernel, "bs_forward_kernel"), grid, dim3u(kThreads), size_t(L.bytes),
            prm);
  check_launch("bs_forward_kernel");
}

// The dK/dV kernel at head dim kDim (its key-side schedule already built). At D=128 the warp
// pairs' exchange (17 KiB) over the largest schedule tables (blocks of one token, 16 KiB) passes
// the 99 KiB of sm_86, sm_89 and sm_120; there the general path's 64-column blocks (4 warps, one
// per 16 keys, S^T and dP^T in each) take 85 KiB.
template <class E, int kDim>
void launch_dkdv(const BsParams& prm, const device_facts& device, stream_t stream) {
  using KTile = BlockSparsePolicy::KeyTile<E>;
  constexpr int kChunk = dkdv_chunk<kDim>, kBlockWarps = dkdv_warps<kDim>;
  const int width = grad_tile_width<kDim>(prm);
  const KeyMajorSmem L =
      key_major_smem<E>(width, width, KTile::row_ints(prm), KTile::col_ints(prm), kBlockWarps);
  if constexpr (kBlockWarps > kWarps) {
    if (size_t(L.bytes) > device.max_dynamic_shared) return launch_dkdv<E, 0>(prm, device, stream);
  }
  auto kernel = bs_backward_dkdv_kernel<E, kDim>;
  prepare_shared(kernel, L.bytes, device, "bs_backward_dkdv_kernel");
  const int widest = std::max(prm.head_dim, prm.value_dim);
  launch_on(stream, named(kernel, "bs_backward_dkdv_kernel"),
            dim3u(uint32_t(prm.batch * prm.kv_heads * prm.key_tiles),
                  uint32_t((widest + kChunk - 1) / kChunk)),
            dim3u(32 * kBlockWarps), size_t(L.bytes), prm);
  check_launch("bs_backward_dkdv_kernel");
}

template <class E, int kDim>
void backward_with(const BlockSparseProblem& p, int32_t* workspace, stream_t stream) {
  using T = typename E::T;
  using QTile = BlockSparsePolicy::QueryTile<E>;
  BsParams prm = make_params<E>(p);
  const SidePlan qside = query_side<E>(p), kside = key_side<E>(p);
  const int64_t rows = p.batch * p.q_len * p.heads;
  prm.qs = schedule_at(workspace, qside);
  float* delta = reinterpret_cast<float*>(workspace + qside.words());
  prm.delta = delta;
  prm.ks = schedule_at(workspace + qside.words() + rows, kside);
  prm.direct_q = qside.direct;
  prm.q_per = qside.per;
  prm.direct_k = kside.direct;
  prm.k_per = kside.per;
  const device_facts device = checked_device();
  Registrations r;
  register_inputs<E>(r, p);
  register_layout(r, p, true);
  r.add(workspace, size_t(workspace_words<E>(p, true)) * 4, "schedules and delta (workspace)");
  r.add(p.out.data, view_span(p.out, p.batch, p.q_len, p.heads, p.value_dim) * sizeof(T), "out");
  r.add(p.grad_out.data, view_span(p.grad_out, p.batch, p.q_len, p.heads, p.value_dim) * sizeof(T),
        "grad_out");
  r.add(p.lse, size_t(rows) * sizeof(float), "lse");
  if (p.grad_lse) r.add(p.grad_lse, size_t(rows) * sizeof(float), "grad_lse");
  r.add(p.grad_q.data, size_t(rows * p.head_dim) * sizeof(T), "grad_q");
  const int64_t kv_rows = p.batch * p.kv_len * p.kv_heads;
  r.add(p.grad_k.data, size_t(kv_rows * p.head_dim) * sizeof(T), "grad_k");
  r.add(p.grad_v.data, size_t(kv_rows * p.value_dim) * sizeof(T), "grad_v");
  r.commit();

  launch_on(stream, named(bs_backward_delta_kernel<E>, "bs_backward_delta_kernel"),
            dim3u(uint32_t((rows + kWarps - 1) / kWarps)), dim3u(kThreads), 0, prm);
  check_launch("bs_backward_delta_kernel");

  constexpr int kDqChunk = dq_chunk<kDim>;
  const int width = grad_tile_width<kDim>(prm);
  if (!qside.direct)
    launch_schedule(bs_schedule_kernel<E, 1>, "bs_schedule_kernel",
                    query_schedule_params<E>(p, qside, prm.qs), device, stream);
  const QueryMajorSmem Lq =
      query_major_smem<E>(width, width, true, false, QTile::row_ints(prm), QTile::key_ints(prm));
  auto dq_kernel = bs_backward_dq_kernel<E, kDim>;
  prepare_shared(dq_kernel, Lq.bytes, device, "bs_backward_dq_kernel");
  launch_on(stream, named(dq_kernel, "bs_backward_dq_kernel"),
            dim3u(uint32_t(prm.batch * prm.heads * prm.q_tiles),
                  uint32_t((prm.head_dim + kDqChunk - 1) / kDqChunk)),
            dim3u(kThreads), size_t(Lq.bytes), prm);
  check_launch("bs_backward_dq_kernel");

  if (prm.key_tiles == 0) return;
  if (!kside.direct)
    launch_schedule(bs_schedule_kernel<E, 2>, "bs_schedule_kernel",
                    key_schedule_params<E>(p, kside, prm.ks), device, stream);
  launch_dkdv<E, kDim>(prm, device, stream);
}

// D == Dv in {32, 64, 128} on tensor cores gets a fully unrolled instantiation (as for
// neighborhood attention); everything else takes the general path.
template <class E>
int specialized_dim(const BlockSparseProblem& p) {
  if (!E::kTensorCore || p.head_dim != p.value_dim) return 0;
  return p.head_dim == 32 || p.head_dim == 64 || p.head_dim == 128 ? int(p.head_dim) : 0;
}

template <class E>
void forward(const BlockSparseProblem& p, int32_t* workspace, void* stream) {
  const stream_t s = stream_t(stream);
  if constexpr (!E::kTensorCore) {
    forward_with<E, 0>(p, workspace, s);
  } else {
    switch (specialized_dim<E>(p)) {
      case 32: return forward_with<E, 32>(p, workspace, s);
      case 64: return forward_with<E, 64>(p, workspace, s);
      case 128: return forward_with<E, 128>(p, workspace, s);
      default: return forward_with<E, 0>(p, workspace, s);
    }
  }
}

template <class E>
void backward(const BlockSparseProblem& p, int32_t* workspace, void* stream) {
  const stream_t s = stream_t(stream);
  if constexpr (!E::kTensorCore) {
    backward_with<E, 0>(p, workspace, s);
  } else {
    switch (specialized_dim<E>(p)) {
      case 32: return backward_with<E, 32>(p, workspace, s);
      case 64: return backward_with<E, 64>(p, workspace, s);
      case 128: return backward_with<E, 128>(p, workspace, s);
      default: return backward_with<E, 0>(p, workspace, s);
    }
  }
}

}  // namespace bs_host
}  // namespace tokenmix::cuda
