// Host side of the CUDA neighborhood-attention engine: NeighborhoodProblem -> NaParams, the choice
// of kernel instantiation, shared-memory sizing and launches. Included by the per-dtype
// instantiation files (csrc/neighborhood/cuda/), which nvcc compiles for the GPU and the host
// compiler compiles for the SIMT emulator.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "tokenmix/attention_problem.h"
#include "tokenmix/cuda/attention_engine.h"
#include "tokenmix/cuda/launch_common.h"
#include "tokenmix/cuda/na_entry.h"
#include "tokenmix/cuda/neighborhood_policy.h"
#include "tokenmix/neighborhood_chunking.h"

namespace tokenmix::cuda {

// The neighborhood-attention kernels: the engine's bodies with NeighborhoodPolicy. Their names
// (and template arguments) are what ptxas reports and profiles show.
template <class E, int kDim>
TM_GLOBAL void na_forward_kernel(NaParams p) {
  attention_forward<NeighborhoodPolicy, E, kDim>(p);
}
// The sm_90a (wgmma) forward (take_wgmma_forward): in the GPU build, na_forward_wg.cu alone
// compiles it, for sm_90a only. Its key rows are int32_t offsets (taken only where
// narrow_key_offsets holds).
template <class E, int kDim>
TM_GLOBAL void na_forward_wg_kernel(NaParams p) {
  attention_forward<NeighborhoodPolicy, E, kDim, true, int32_t>(p);
}
template <class E>
TM_GLOBAL void na_backward_delta_kernel(NaParams p) {
  attention_delta<NeighborhoodPolicy, E>(p);
}
template <class E, int kDim>
TM_GLOBAL void na_backward_dq_kernel(NaParams p) {
  attention_dq<NeighborhoodPolicy, E, kDim>(p);
}
template <class E, int kDim>
TM_GLOBAL void na_backward_dkdv_kernel(NaParams p) {
  attention_dkdv<NeighborhoodPolicy, E, kDim>(p);
}

// grad_rpb[h, e] = sum over (batch, tile) of the per-tile partials, in that order.
// (A template so that each backward translation unit owns its instantiation.)
template <class E>
TM_GLOBAL void na_backward_rpb_reduce_kernel(NaParams p) {
  const int64_t index = int64_t(block_idx().x) * kThreads + linear_thread_idx();
  if (index >= int64_t(p.heads) * p.rpb_size) return;
  const int h = int(index / p.rpb_size), e = int(index % p.rpb_size);
  const global_ptr<const float> partial(p.grad_rpb_partial);
  float acc = 0.0f;
  for (int b = 0; b < p.batch; ++b)
    for (int64_t t = 0; t < p.tiles_per_head; ++t)
      acc += partial[((int64_t(b) * p.heads + h) * p.tiles_per_head + t) * p.rpb_size + e];
  global_ptr<float>(p.grad_rpb)[index] = acc;
}

// Elements spanned by a [B, S0, S1, S2, H, cols] view.
inline size_t view_span(const StridedView& v, const NeighborhoodProblem& p, int64_t heads,
                        int64_t cols) {
  const int64_t sizes[5] = {p.batch, p.dims[0].length, p.dims[1].length, p.dims[2].length, heads};
  int64_t last = cols;
  for (int i = 0; i < 5; ++i) last += (sizes[i] - 1) * v.stride[i];
  return size_t(last);
}

// [B, N, H, cols] views of the additional tokens keep the tokens in stride[3].
inline size_t extra_span(const StridedView& v, const NeighborhoodProblem& p, int64_t cols) {
  return size_t((p.batch - 1) * v.stride[0] + (p.num_extra - 1) * v.stride[3] +
                (p.kv_heads - 1) * v.stride[4] + cols);
}

// Whether one past the last element of every (batch, kv head) of K and V is at most 2^31 - 1
// elements from that head's first element (and likewise for the additional tokens): then the
// key rows' offsets, with their columns, fit int32_t (NeighborhoodPolicy::QueryTile<E, int32_t>).
inline bool narrow_key_offsets(const NeighborhoodProblem& p) {
  const auto fits = [](int64_t span) { return span <= int64_t(INT32_MAX); };
  const auto head_span = [&](const StridedView& v, int64_t cols) {
    int64_t last = cols;  // one past the last column of the last token (strides are >= 0)
    for (int t = 0; t < 3; ++t) last += (p.dims[t].length - 1) * v.stride[t + 1];
    return last;
  };
  bool ok = fits(head_span(p.k, p.head_dim)) && fits(head_span(p.v, p.value_dim));
  if (p.num_extra > 0)
    ok = ok && fits((p.num_extra - 1) * p.extra_k.stride[3] + p.head_dim) &&
         fits((p.num_extra - 1) * p.extra_v.stride[3] + p.value_dim);
  return ok;
}

template <class E>
NaParams make_params(const NeighborhoodProblem& p) {
  NaParams k{};
  int tile[3];
  static_assert(kQueryTileVolume == kTileRows, "tokenmix.plan reports the tiles the kernels use");
  choose_tile_shape(p.dims, kQueryTileVolume, tile);
  k.sched.init(p.dims, tile);
  k.batch = int(p.batch);
  k.heads = int(p.heads);
  k.kv_heads = int(p.kv_heads);
  k.head_dim = int(p.head_dim);
  k.value_dim = int(p.value_dim);
  k.head_dim_padded = round_up_to(k.head_dim, E::kStep);
  k.value_dim_padded = round_up_to(k.value_dim, E::kStep);
  k.num_extra = int(p.num_extra);
  k.tokens = int(p.tokens());
  k.tiles_per_head = k.sched.tiles_per_head();
  k.key_tiles_per_head = k.tiles_per_head;
  k.extra_tiles = (k.num_extra + kTileRows - 1) / kTileRows;
  k.scale = float(p.scale);
  k.scale_log2 = float(p.scale) * kLog2e;
  for (int i = 0; i < 5; ++i) {
    k.q_st[i] = p.q.stride[i];
    k.k_st[i] = p.k.stride[i];
    k.v_st[i] = p.v.stride[i];
    k.o_st[i] = p.out.stride[i];
    k.go_st[i] = p.grad_out.stride[i];
  }
  const int extra_axes[3] = {0, 3, 4};  // batch, token, head of the padded extra view
  for (int i = 0; i < 3; ++i) {
    k.ek_st[i] = p.extra_k.stride[extra_axes[i]];
    k.ev_st[i] = p.extra_v.stride[extra_axes[i]];
  }
  k.q = p.q.data;
  k.k = p.k.data;
  k.v = p.v.data;
  k.extra_k = p.extra_k.data;
  k.extra_v = p.extra_v.data;
  k.rpb = p.rpb;
  for (int t = 0; t < 3; ++t) k.rpb_dims[t] = 2 * p.dims[t].kernel - 1;
  k.rpb_size = int(p.rpb_size());
  k.out = p.out.data;
  k.lse = static_cast<float*>(p.lse);
  k.grad_out = p.grad_out.data;
  k.out_in = p.out.data;
  k.lse_in = static_cast<const float*>(p.lse);
  k.grad_lse = static_cast<const float*>(p.grad_lse);
  k.grad_q = p.grad_q.data;
  k.grad_k = p.grad_k.data;
  k.grad_v = p.grad_v.data;
  k.grad_extra_k = p.grad_extra_k.data;
  k.grad_extra_v = p.grad_extra_v.data;
  k.grad_rpb = static_cast<float*>(p.grad_rpb);
  return k;
}

template <class E>
void register_inputs(Registrations& r, const NeighborhoodProblem& p) {
  using T = typename E::T;
  r.add(p.q.data, view_span(p.q, p, p.heads, p.head_dim) * sizeof(T), "q");
  r.add(p.k.data, view_span(p.k, p, p.kv_heads, p.head_dim) * sizeof(T), "k");
  r.add(p.v.data, view_span(p.v, p, p.kv_heads, p.value_dim) * sizeof(T), "v");
  if (p.num_extra > 0) {
    r.add(p.extra_k.data, extra_span(p.extra_k, p, p.head_dim) * sizeof(T), "additional_keys");
    r.add(p.extra_v.data, extra_span(p.extra_v, p, p.value_dim) * sizeof(T), "additional_values");
  }
  if (p.rpb) r.add(p.rpb, size_t(p.heads * p.rpb_size()) * sizeof(T), "rpb");
}

template <class E, int kDim, bool kWgmma = false>
void forward_with(const NeighborhoodProblem& p, stream_t stream) {
  const NaParams prm = make_params<E>(p);
  constexpr int kVChunk = kDim > 0 ? kDim : 64;
  using Tile = NeighborhoodPolicy::QueryTile<E, std::conditional_t<kWgmma, int32_t, int64_t>>;
  const QueryMajorSmem L = query_major_smem<E>(prm.head_dim_padded, kVChunk, false, false,
                                               Tile::row_ints(prm), Tile::key_ints(prm), kWgmma);
  const auto kernel = [] {
    if constexpr (kWgmma)
      return named(na_forward_wg_kernel<E, kDim>, "na_forward_wg_kernel");
    else
      return named(na_forward_kernel<E, kDim>, "na_forward_kernel");
  }();
  prepare_shared(kernel.fn, L.bytes, checked_device(), kernel.name);
  Registrations r;
  register_inputs<E>(r, p);
  r.add(p.out.data, view_span(p.out, p, p.heads, p.value_dim) * sizeof(typename E::T), "out");
  r.add(p.lse, size_t(p.batch * p.tokens() * p.heads) * sizeof(float), "lse");
  r.commit();
  const dim3u grid(uint32_t(prm.batch * prm.heads * prm.tiles_per_head),
                   uint32_t((prm.value_dim + kVChunk - 1) / kVChunk));
  launch_on(stream, kernel, grid, dim3u(kThreads), size_t(L.bytes), prm);
  check_launch(kernel.name);
}

template <class E, int kDim>
void backward_with(const NeighborhoodProblem& p, bool deterministic, float* delta, float* partial,
                   stream_t stream) {
  using T = typename E::T;
  NaParams prm = make_params<E>(p);
  prm.delta = delta;
  prm.deterministic = deterministic && p.rpb != nullptr;
  prm.grad_rpb_partial = prm.deterministic ? partial : nullptr;
  const int64_t rows = p.batch * p.tokens() * p.heads;
  const device_facts device = checked_device();
  Registrations r;
  register_inputs<E>(r, p);
  r.add(p.out.data, view_span(p.out, p, p.heads, p.value_dim) * sizeof(T), "out");
  r.add(p.grad_out.data, view_span(p.grad_out, p, p.heads, p.value_dim) * sizeof(T), "grad_out");
  r.add(p.lse, size_t(rows) * sizeof(float), "lse");
  if (p.grad_lse) r.add(p.grad_lse, size_t(rows) * sizeof(float), "grad_lse");
  r.add(delta, size_t(rows) * sizeof(float), "delta (workspace)");
  r.add(p.grad_q.data, size_t(rows * p.head_dim) * sizeof(T), "grad_q");
  const int64_t kv_rows = p.batch * p.tokens() * p.kv_heads;
  r.add(p.grad_k.data, size_t(kv_rows * p.head_dim) * sizeof(T), "grad_k");
  r.add(p.grad_v.data, size_t(kv_rows * p.value_dim) * sizeof(T), "grad_v");
  if (p.num_extra > 0) {
    const int64_t extra_rows = p.batch * p.num_extra * p.kv_heads;
    r.add(p.grad_extra_k.data, size_t(extra_rows * p.head_dim) * sizeof(T), "grad_extra_k");
    r.add(p.grad_extra_v.data, size_t(extra_rows * p.value_dim) * sizeof(T), "grad_extra_v");
  }
  if (p.rpb) r.add(p.grad_rpb, size_t(p.heads * p.rpb_size()) * sizeof(float), "grad_rpb");
  if (prm.deterministic)
    r.add(partial, size_t(p.batch * p.heads * prm.tiles_per_head * p.rpb_size()) * sizeof(float),
          "grad_rpb partials (workspace)");
  r.commit();

  launch_on(stream, named(na_backward_delta_kernel<E>, "na_backward_delta_kernel"),
            dim3u(uint32_t((rows + kWarps - 1) / kWarps)), dim3u(kThreads), 0, prm);
  check_launch("na_backward_delta_kernel");

  constexpr int kDqChunk = dq_chunk<kDim>, kDkdvChunk = dkdv_chunk<kDim>;
  constexpr int kDkdvWarps = dkdv_warps<kDim>;
  const int width = grad_tile_width<kDim>(prm);
  using QTile = NeighborhoodPolicy::QueryTile<E>;
  using KTile = NeighborhoodPolicy::KeyTile<E>;
  const QueryMajorSmem Lq = query_major_smem<E>(width, width, true, QTile::bias_stage(prm),
                                                QTile::row_ints(prm), QTile::key_ints(prm));
  auto dq_kernel = na_backward_dq_kernel<E, kDim>;
  prepare_shared(dq_kernel, Lq.bytes, device, "na_backward_dq_kernel");
  launch_on(stream, named(dq_kernel, "na_backward_dq_kernel"),
            dim3u(uint32_t(prm.batch * prm.heads * prm.tiles_per_head),
                  uint32_t((prm.head_dim + kDqChunk - 1) / kDqChunk)),
            dim3u(kThreads), size_t(Lq.bytes), prm);
  check_launch("na_backward_dq_kernel");

  const KeyMajorSmem Lk =
      key_major_smem<E>(width, width, KTile::row_ints(prm), KTile::col_ints(prm), kDkdvWarps);
  auto dkdv_kernel = na_backward_dkdv_kernel<E, kDim>;
  prepare_shared(dkdv_kernel, Lk.bytes, device, "na_backward_dkdv_kernel");
  const int widest = std::max(prm.head_dim, prm.value_dim);
  launch_on(stream, named(dkdv_kernel, "na_backward_dkdv_kernel"),
            dim3u(uint32_t(prm.batch * prm.kv_heads * (prm.key_tiles_per_head + prm.extra_tiles)),
                  uint32_t((widest + kDkdvChunk - 1) / kDkdvChunk)),
            dim3u(32 * kDkdvWarps), size_t(Lk.bytes), prm);
  check_launch("na_backward_dkdv_kernel");

  if (prm.deterministic) {
    const int64_t entries = int64_t(prm.heads) * prm.rpb_size;
    launch_on(stream, named(na_backward_rpb_reduce_kernel<E>, "na_backward_rpb_reduce_kernel"),
              dim3u(uint32_t((entries + kThreads - 1) / kThreads)), dim3u(kThreads), 0, prm);
    check_launch("na_backward_rpb_reduce_kernel");
  }
}

// D == Dv in {32, 64, 128} on tensor cores gets a fully unrolled instantiation; everything else
// takes the general path.
template <class E>
int specialized_dim(const NeighborhoodProblem& p) {
  if (!E::kTensorCore || p.head_dim != p.value_dim) return 0;
  return p.head_dim == 32 || p.head_dim == 64 || p.head_dim == 128 ? int(p.head_dim) : 0;
}

// Whether the whole-chunk (wgmma) forward pays for this problem at head dim `dim`
// (tokenmix/neighborhood_chunking.h: the pairs of the two kernels, counted on the kernels' own
// schedule). Cached per window geometry and head dim, so that a forward call does not count again.
inline bool whole_chunks_pay_for(const NeighborhoodProblem& p, int dim) {
  static_assert(kChunkWarpRows == kTileRows / kWarps, "a warp owns 16 rows of the query tile");
  static_assert(kChunkGroupKeys == 2 * 8, "kept_groups: a group is two 8-column fragments");
  static_assert(kWgmmaKeyChunk == F16::kKeys && kWgmmaKeyChunk == BF16::kKeys,
                "the sm_90a kernel's chunks are the fp16/bf16 chunks");
  std::array<int, 16> key{};
  for (int t = 0; t < 3; ++t) {
    const WindowDim& d = p.dims[t];
    const int at = 5 * t;
    key[at] = d.length;
    key[at + 1] = d.kernel;
    key[at + 2] = d.stride;
    key[at + 3] = d.dilation;
    key[at + 4] = d.causal ? 1 : 0;
  }
  key[15] = dim;
  static std::mutex mutex;
  static std::map<std::array<int, 16>, bool> cache;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int tile[3];
  choose_tile_shape(p.dims, kQueryTileVolume, tile);
  NeighborhoodSchedule sched;
  sched.init(p.dims, tile);
  const bool pays = whole_chunks_pay(schedule_chunked_pairs(sched, kWgmmaKeyChunk, true), dim);
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= 1024) cache.clear();  // many geometries: recount rather than grow
  cache.emplace(key, pays);
  return pays;
}

// Whether the forward takes the sm_90a kernel: a device that runs it (sm90a_device), a head dim it
// is instantiated for (`dim`, from specialized_dim; 0 for the others and for float32), key rows
// within int32_t offsets, and $TOKENMIX_WGMMA: 1 takes it, 0 does not, auto (the default) where
// its whole chunks pay. The setting is read first, so that a bad value is an error on every
// device and for every input.
inline bool take_wgmma_forward(const NeighborhoodProblem& p, int dim) {
  const WgmmaSetting setting = wgmma_setting();
  if (dim == 0 || setting == WgmmaSetting::off || !sm90a_device() || !narrow_key_offsets(p))
    return false;
  return setting == WgmmaSetting::on || whole_chunks_pay_for(p, dim);
}

// The sm_90a forward's instantiations (fixed head dims only: the general path has no wgmma form).
template <class E>
void forward_wg(const NeighborhoodProblem& p, stream_t s) {
  switch (specialized_dim<E>(p)) {
    case 32: return forward_with<E, 32, true>(p, s);
    case 64: return forward_with<E, 64, true>(p, s);
    case 128: return forward_with<E, 128, true>(p, s);
    default: throw std::logic_error("tokenmix: the sm_90a forward has no instantiation for this");
  }
}

template <class E>
void forward(const NeighborhoodProblem& p, void* stream) {
  const stream_t s = stream_t(stream);
  [[maybe_unused]] const bool wgmma = take_wgmma_forward(p, specialized_dim<E>(p));
  if constexpr (!E::kTensorCore) {
    forward_with<E, 0>(p, s);
  } else {
    if (wgmma) {
#if defined(__CUDACC__)
#if defined(TOKENMIX_HAS_SM90A)
      // compiled apart, for sm_90a alone (na_forward_wg.cu)
      if constexpr (E::kIsBF16)
        return gpu::na_forward_wg_bf16(p, stream);
      else
        return gpu::na_forward_wg_f16(p, stream);
#endif
#else
      return forward_wg<E>(p, s);
#endif
    }
    switch (specialized_dim<E>(p)) {
      case 32: return forward_with<E, 32>(p, s);
      case 64: return forward_with<E, 64>(p, s);
      case 128: return forward_with<E, 128>(p, s);
      default: return forward_with<E, 0>(p, s);
    }
  }
}

template <class E>
void backward(const NeighborhoodProblem& p, bool deterministic, float* delta, float* partial,
              void* stream) {
  const stream_t s = stream_t(stream);
  if constexpr (!E::kTensorCore) {
    backward_with<E, 0>(p, deterministic, delta, partial, s);
  } else {
    switch (specialized_dim<E>(p)) {
      case 32: return backward_with<E, 32>(p, deterministic, delta, partial, s);
      case 64: return backward_with<E, 64>(p, deterministic, delta, partial, s);
      case 128: return backward_with<E, 128>(p, deterministic, delta, partial, s);
      default: return backward_with<E, 0>(p, deterministic, delta, partial, s);
    }
  }
}

}  // namespace tokenmix::cuda
