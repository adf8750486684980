// torch.ops.tokenmix.na_plan: the tile schedule of neighborhood attention, for tokenmix.plan.
//
// Everything here comes from the host/device headers the kernels use
// (tokenmix/neighborhood_schedule.h, tokenmix/neighborhood_chunking.h, tokenmix/window.h), so the
// planner reports exactly their schedule: the tile shape choose_tile_shape picks, the query tiles
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
#include "tokenmix/neighborhood_chunking.h"
#include "tokenmix/neighborhood_schedule.h"
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

Tensor cpu_int64(const std::vector<int64_t>& size) {
  return torch::stable::empty(size, torch::headeronly::ScalarType::Long, std::nullopt,
                              torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

// Returns (tile_shape [rank], counts [7] = {query tiles, useful pairs, computed pairs, dense
// pairs, chunked pairs, whole-chunk pairs, whole chunks taken} per (batch, head), tiles
// [num_tiles or 0, 5, rank] = group, first, count, key_begin, key_end per query tile). Tiles are
// listed only with return_tiles (they can be many).
// Chunked pairs are the pairs the CUDA forward computes with key chunks of key_chunk keys
// (tokenmix/neighborhood_chunking.h): with a multiple of 16 (their 64 and 32), the mma.sync
// kernels' warp groups, unless wgmma_head_dim is non-zero (a compute capability 9.0 device with
// fp16/bf16 and D = Dv = wgmma_head_dim in {32, 64, 128}) and whole_chunks_pay: then the sm_90a
// kernel's whole chunks, and counts[6] is 1. Otherwise each tile's rows times its key box rounded
// up to whole chunks (1: computed pairs).
std::tuple<Tensor, Tensor, Tensor> na_plan(IntList input_shape, IntList kernel, IntList stride,
                                           IntList dilation, IntList causal, IntList tile_shape,
                                           int64_t tile_volume, int64_t key_chunk,
                                           bool return_tiles, int64_t wgmma_head_dim) {
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

  STD_TORCH_CHECK(
      wgmma_head_dim == 0 || wgmma_head_dim == 32 || wgmma_head_dim == 64 || wgmma_head_dim == 128,
      "tokenmix: wgmma_head_dim = ", wgmma_head_dim, " must be 0, 32, 64 or 128");
  STD_TORCH_CHECK(wgmma_head_dim == 0 || (tile_shape.empty() && tile_volume == 64),
                  "tokenmix: the sm_90a choice is made on the kernels' own tiles: tile_shape "
                  "must be empty and tile_volume 64 with wgmma_head_dim");
  STD_TORCH_CHECK(wgmma_head_dim == 0 || key_chunk == tokenmix::kWgmmaKeyChunk,
                  "tokenmix: the sm_90a kernel's key chunks have ", tokenmix::kWgmmaKeyChunk,
                  " keys, got key_chunk = ", key_chunk);
  tokenmix::NeighborhoodSchedule schedule;
  schedule.init(dims, tile);
  const int64_t candidates = schedule.tiles_per_head();
  const bool grouped = key_chunk % tokenmix::kChunkGroupKeys == 0;
  const tokenmix::ChunkedPairs pairs =
      tokenmix::schedule_chunked_pairs(schedule, key_chunk, grouped);
  STD_TORCH_CHECK(!pairs.overflow,
                  "tokenmix: the problem is too large: its pair count overflows int64");
  const bool whole = wgmma_head_dim != 0 && tokenmix::whole_chunks_pay(pairs, int(wgmma_head_dim));
  const int64_t chunked = grouped && !whole ? pairs.grouped : pairs.whole;
  const int64_t num_tiles = pairs.tiles;

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

  Tensor counts = cpu_int64({7});
  auto* count_data = static_cast<int64_t*>(counts.data_ptr());
  count_data[0] = num_tiles;
  count_data[1] = useful;
  count_data[2] = computed;
  count_data[3] = dense;
  count_data[4] = chunked;
  count_data[5] = pairs.whole;
  count_data[6] = whole ? 1 : 0;

  Tensor tiles = cpu_int64({return_tiles ? num_tiles : 0, 5, rank});
  if (return_tiles) {
    tokenmix::TileGeometry g;
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

// The sm_90a choice's threshold (tokenmix/neighborhood_chunking.h): the whole-chunk kernel is
// taken when chunked pairs in warp groups >= this times whole-chunk pairs.
double na_wgmma_break_even(int64_t head_dim) {
  STD_TORCH_CHECK(head_dim == 32 || head_dim == 64 || head_dim == 128,
                  "tokenmix: head_dim = ", head_dim, " must be 32, 64 or 128");
  return tokenmix::wgmma_break_even(int(head_dim));
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  m.def(
      "na_plan(int[] input_shape, int[] kernel_size, int[] stride, int[] dilation, "
      "int[] is_causal, int[] tile_shape, int tile_volume, int key_chunk, bool return_tiles, "
      "int wgmma_head_dim=0) -> (Tensor, Tensor, Tensor)");
  m.def("na_wgmma_break_even(int head_dim) -> float");
}

// No tensor inputs: CompositeExplicitAutograd serves every dispatch (as for cpu_isa).
STABLE_TORCH_LIBRARY_IMPL(tokenmix, CompositeExplicitAutograd, m) {
  m.impl("na_plan", TORCH_BOX(&na_plan));
  m.impl("na_wgmma_break_even", TORCH_BOX(&na_wgmma_break_even));
}
