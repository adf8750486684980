// torch.ops.tokenmix.na_plan: the tile schedule of neighborhood attention, for tokenmix.plan.
//
// Everything here comes from the host/device headers the kernels use
// (tokenmix/neighborhood_schedule.h, tokenmix/segmented_box.h, tokenmix/window.h), so the planner
// reports exactly their schedule: the tile shape choose_tile_shape picks, the query tiles
// NeighborhoodSchedule::decode yields and the pair counts tile_pairs_along / window_pairs_along
// give. The op takes int lists and returns int64 CPU tensors; with no tensor inputs it needs no
// per-device kernel. Argument checking that users hit happens in Python
// (tokenmix/neighborhood/plan.py); the checks here guard direct calls.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "na_window_args.h"
#include "tokenmix/neighborhood_schedule.h"
#include "tokenmix/segmented_box.h"
#include "tokenmix/stable_op_utils.h"
#include "tokenmix/window.h"

namespace {

using torch::stable::Tensor;
using IntList = torch::headeronly::HeaderOnlyArrayRef<int64_t>;

using tokenmix::na_op::check_window_args;

// Limit that keeps the header's int arithmetic (first + tile - 1, ...) in range; the spatial
// extents are limited by check_window_args (na_window_args.h).
constexpr int64_t kMaxTile = int64_t(1) << 20;

// a * b, raising instead of wrapping: pair counts of huge problems leave int64.
int64_t checked_mul(int64_t a, int64_t b) {
  return tokenmix::checked_mul(a, b, "the problem is too large: its pair count");
}

int64_t checked_add(int64_t a, int64_t b) {
  int64_t r = 0;
  STD_TORCH_CHECK(!__builtin_add_overflow(a, b, &r),
                  "tokenmix: the problem is too large: its pair count overflows int64");
  return r;
}

Tensor cpu_int64(const std::vector<int64_t>& size) {
  return torch::stable::empty(size, torch::headeronly::ScalarType::Long, std::nullopt,
                              torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

// The CUDA kernels' warps own kWarpRows consecutive rows of a query tile each and skip, in a
// partial key chunk, the groups of kGroupKeys keys that none of their rows keeps
// (attention_forward.h, online_softmax.h kept_groups).
constexpr int kWarpRows = 16, kGroupKeys = 16;

// Pairs the CUDA kernels compute for query tile g of `rows` rows (padding included) in chunks of
// key_chunk keys (a multiple of kGroupKeys): the key box in SegmentedBox order, cut into chunks. A
// full chunk (inside the inner box: every query of the tile keeps it) is computed whole by every
// warp. In the others a warp computes the groups that one of its rows keeps: a key of the inner
// box is kept by every query, any other by the queries whose window holds it in every dimension;
// keys past the box and padding rows keep nothing. kWarpRows x kGroupKeys pairs per group.
// `scratch` holds the coordinates of the partial chunks' keys (reused from tile to tile).
int64_t warp_group_pairs(const tokenmix::NeighborhoodSchedule& sched,
                         const tokenmix::TileGeometry& g, int64_t rows, int64_t key_chunk,
                         std::vector<int>& scratch) {
  tokenmix::SegmentedBox box;
  tokenmix::tile_key_box(sched, g, &box);
  const int64_t volume = box.volume(), inner = box.inner();
  const int64_t full_chunks = inner / key_chunk;
  const int64_t chunks = (volume + key_chunk - 1) / key_chunk;
  const int64_t warps = (rows + kWarpRows - 1) / kWarpRows;
  const int nrows = g.count[0] * g.count[1] * g.count[2];
  int64_t groups = checked_mul(warps, full_chunks * (key_chunk / kGroupKeys));
  const int64_t first_partial = full_chunks * key_chunk;
  scratch.resize(size_t(3 * (volume > first_partial ? volume - first_partial : 0)));
  for (int64_t k = first_partial; k < volume; ++k)
    box.coords(int(k), scratch.data() + 3 * (k - first_partial));
  for (int64_t w = 0; w < warps; ++w) {
    const int r0 = int(w * kWarpRows);
    const int r1 = nrows < r0 + kWarpRows ? nrows : r0 + kWarpRows;
    if (r0 >= r1) continue;  // padding rows only: every element of a partial chunk is masked
    int lo[kWarpRows][3], hi[kWarpRows][3];
    for (int r = r0; r < r1; ++r) {
      int i[3];
      tokenmix::unravel_box(r, g.count, i);
      for (int t = 0; t < 3; ++t)
        sched.window(g, t, g.first[t] + i[t], &lo[r - r0][t], &hi[r - r0][t]);
    }
    auto kept_by_warp = [&](int64_t index) {
      if (index < inner) return true;
      const int* c = scratch.data() + 3 * (index - first_partial);
      for (int r = 0; r < r1 - r0; ++r) {
        bool in = true;
        for (int t = 0; t < 3; ++t) in = in && c[t] >= lo[r][t] && c[t] < hi[r][t];
        if (in) return true;
      }
      return false;
    };
    for (int64_t k0 = first_partial; k0 < chunks * key_chunk; k0 += kGroupKeys) {
      bool kept = false;
      for (int64_t k = k0; k < k0 + kGroupKeys && k < volume && !kept; ++k) kept = kept_by_warp(k);
      groups += kept ? 1 : 0;
    }
  }
  return checked_mul(groups, int64_t(kWarpRows) * kGroupKeys);
}

// Returns (tile_shape [rank], counts [5] = {query tiles, useful pairs, computed pairs, dense
// pairs, chunked pairs} per (batch, head), tiles [num_tiles or 0, 5, rank] = group, first, count,
// key_begin, key_end per query tile). Tiles are listed only with return_tiles (they can be many).
// Chunked pairs are the pairs the CUDA kernels compute with key chunks of key_chunk keys: with a
// multiple of kGroupKeys (their 64 and 32), warp_group_pairs; otherwise each tile's rows times its
// key box rounded up to whole chunks (1: computed pairs).
std::tuple<Tensor, Tensor, Tensor> na_plan(IntList input_shape, IntList kernel, IntList stride,
                                           IntList dilation, IntList causal, IntList tile_shape,
                                           int64_t tile_volume, int64_t key_chunk,
                                           bool return_tiles) {
  const int rank = int(input_shape.size());
  STD_TORCH_CHECK(rank >= 1 && rank <= 3, "tokenmix: input_shape must have 1 to 3 entries, got ",
                  input_shape.size());
  STD_TORCH_CHECK(tile_shape.empty() || int(tile_shape.size()) == rank,
                  "tokenmix: tile_shape must be empty or have one entry per spatial dimension (",
                  rank, "), got ", tile_shape.size());

  // Rank < 3 problems are padded with leading length-1 dimensions, as in na_ops.cpp.
  tokenmix::WindowDim dims[3];
  int tile[3] = {1, 1, 1};
  check_window_args(input_shape.data(), rank, kernel, stride, dilation, causal, "input_shape entry",
                    dims);
  if (tile_shape.empty()) {
    STD_TORCH_CHECK(
        tile_volume >= 1 && tile_volume <= kMaxTile && (tile_volume & (tile_volume - 1)) == 0,
        "tokenmix: tile_volume = ", tile_volume, " must be a power of two between 1 and 2^20");
    tokenmix::choose_tile_shape(dims, int(tile_volume), tile);
  } else {
    for (int i = 0; i < rank; ++i) {
      STD_TORCH_CHECK(tile_shape[i] >= 1 && tile_shape[i] <= kMaxTile, "tokenmix: tile_shape[", i,
                      "] = ", tile_shape[i], " must be between 1 and 2^20");
      tile[3 - rank + i] = int(tile_shape[i]);
    }
  }

  STD_TORCH_CHECK(key_chunk >= 1 && key_chunk <= kMaxTile, "tokenmix: key_chunk = ", key_chunk,
                  " must be between 1 and 2^20");

  tokenmix::NeighborhoodSchedule schedule;
  schedule.init(dims, tile);
  const int64_t candidates = schedule.tiles_per_head();
  const int64_t rows = int64_t(tile[0]) * tile[1] * tile[2];  // padding included
  int64_t num_tiles = 0, chunked = 0;
  std::vector<int> scratch;
  tokenmix::TileGeometry g;
  for (int64_t index = 0; index < candidates; ++index) {
    if (!schedule.decode(index, &g)) continue;  // past the end of a shorter dilation group
    ++num_tiles;
    if (key_chunk % kGroupKeys == 0) {
      chunked = checked_add(chunked, warp_group_pairs(schedule, g, rows, key_chunk, scratch));
      continue;
    }
    int64_t box = 1;
    for (int t = 0; t < 3; ++t) box = checked_mul(box, g.key_end[t] - g.key_begin[t]);
    chunked =
        checked_add(chunked, checked_mul(rows, (box + key_chunk - 1) / key_chunk * key_chunk));
  }

  int64_t useful = 1, computed = 1, tokens = 1;
  for (int t = 0; t < 3; ++t) {
    useful = checked_mul(useful, tokenmix::window_pairs_along(dims[t]));
    computed = checked_mul(computed, tokenmix::tile_pairs_along(dims[t], tile[t]));
    tokens = checked_mul(tokens, dims[t].length);
  }
  const int64_t dense = checked_mul(tokens, tokens);

  Tensor tile_out = cpu_int64({rank});
  auto* tile_data = static_cast<int64_t*>(tile_out.data_ptr());
  for (int i = 0; i < rank; ++i) tile_data[i] = tile[3 - rank + i];

  Tensor counts = cpu_int64({5});
  auto* count_data = static_cast<int64_t*>(counts.data_ptr());
  count_data[0] = num_tiles;
  count_data[1] = useful;
  count_data[2] = computed;
  count_data[3] = dense;
  count_data[4] = chunked;

  Tensor tiles = cpu_int64({return_tiles ? num_tiles : 0, 5, rank});
  if (return_tiles) {
    auto* out = static_cast<int64_t*>(tiles.data_ptr());
    for (int64_t index = 0; index < candidates; ++index) {
      if (!schedule.decode(index, &g)) continue;  // past the end of a shorter dilation group
      const int* rows[5] = {g.group, g.first, g.count, g.key_begin, g.key_end};
      for (int r = 0; r < 5; ++r)
        for (int i = 0; i < rank; ++i) *out++ = rows[r][3 - rank + i];
    }
  }
  return {tile_out, counts, tiles};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  m.def(
      "na_plan(int[] input_shape, int[] kernel_size, int[] stride, int[] dilation, "
      "int[] is_causal, int[] tile_shape, int tile_volume, int key_chunk, bool return_tiles) -> "
      "(Tensor, Tensor, Tensor)");
}

// No tensor inputs: CompositeExplicitAutograd serves every dispatch (as for cpu_isa).
STABLE_TORCH_LIBRARY_IMPL(tokenmix, CompositeExplicitAutograd, m) {
  m.impl("na_plan", TORCH_BOX(&na_plan));
}
