// Grid-stride loops over a 1-D grid, shared by the pointwise kernels of every family.
#pragma once

#include <cstdint>

#include "tokenmix/simt/simt.h"

namespace tokenmix::cuda {

using namespace ::tokenmix::simt;

// This thread's index in a 1-D grid, and the grid's thread count (grid-stride loops).
TM_DEVICE int64_t grid_thread() {
  return int64_t(block_idx().x) * block_dim().x + thread_idx().x;
}
TM_DEVICE int64_t grid_threads() {
  return int64_t(grid_dim().x) * block_dim().x;
}

}  // namespace tokenmix::cuda
