// Test library only: the block-sparse tile schedules of a backward problem, built by the schedule
// kernel on the emulator and read back (torch.ops.tokenmix_emulated.block_sparse_schedule), so
// that the tests can check which chunks a tile visits and which are full.
#pragma once

#include <cstdint>
#include <vector>

#include "tokenmix/block_sparse_problem.h"

namespace tokenmix::cuda::emulated {

// One side: per (layout head row, tile) a count and `max` entries (chunk << 1 | full), as the
// kernels read them. A side in direct mode has no schedule (scheduled false, nothing listed).
struct BsSideSchedule {
  bool scheduled = false;
  int64_t head_rows = 0, tiles = 0, max = 0;
  std::vector<int32_t> count, entry;
};

// Query tiles x key chunks (forward, dQ) and key tiles x query chunks (dK/dV).
struct BsSchedules {
  BsSideSchedule query, key;
};

BsSchedules bs_schedules(const BlockSparseProblem& p);

}  // namespace tokenmix::cuda::emulated
