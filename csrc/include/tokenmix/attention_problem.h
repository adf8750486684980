// The neighborhood-attention problem descriptor handed from the op layer (torch stable ABI) to the
// backend kernels. Plain data only: the kernel translation units never see a
// torch header, so they compile fast and once per instruction set.
#pragma once

#include <cstdint>

#include "tokenmix/tensor_view.h"
#include "tokenmix/window.h"

namespace tokenmix {

struct NeighborhoodProblem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, heads = 0, kv_heads = 0, head_dim = 0, value_dim = 0;
  int64_t num_extra = 0;  // additional key/value tokens
  WindowDim dims[3];      // leading dimensions of rank < 3 have length 1, kernel 1
  double scale = 1.0;

  StridedView q, k, v, extra_k, extra_v;
  const void* rpb = nullptr;  // contiguous [H, 2k0-1, 2k1-1, 2k2-1], dtype
  StridedView out;            // [B, S.., H, Dv], dtype
  void* lse = nullptr;        // contiguous [B, S0, S1, S2, H], fp32 (fp64 for fp64 problems)

  // Backward only.
  StridedView grad_out;
  StridedView grad_q, grad_k, grad_v, grad_extra_k, grad_extra_v;  // contiguous, dtype
  const void* grad_lse = nullptr;  // optional, like lse: gradient flowing into the LSE output
  void* grad_rpb = nullptr;        // contiguous, fp32 (fp64 for fp64 problems)

  ParallelForFn parallel_for = nullptr;
  int num_threads = 1;

  int64_t tokens() const { return int64_t(dims[0].length) * dims[1].length * dims[2].length; }
  int64_t rpb_size() const {
    return int64_t(2 * dims[0].kernel - 1) * (2 * dims[1].kernel - 1) * (2 * dims[2].kernel - 1);
  }
};

}  // namespace tokenmix
