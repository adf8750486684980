// The chunk math that the CPU scan engines (tokenmix/cpu/linear_scan_engine.h,
// delta_rule_engine.h) and the CUDA scan kernels (tokenmix/cuda/linear_scan_kernels.h,
// delta_rule_kernels.h) share: the decay factors of a chunk, each the exponential of a sum of
// log decays over its own range, never a difference of two cumulative sums. After a reset
// (a log decay of -1e9 or -inf) such a difference has lost every digit of the decays that
// follow; a direct sum has not, so resets stay exact on both backends.
//
// V is the value type (a float, or a CPU SIMD vector of keys); lg(i) the log decay of token i
// of the chunk, exp the exponential in lg's base (2^x or e^x); out(i, f) receives the factor
// of token i. Tokens i >= c (past the end of the sequence) get 0.
#pragma once

#include "tokenmix/host_device.h"

namespace tokenmix {

// out(i, exp(sum_{t<=i} lg_t)) for i < chunk; returns the chunk's total decay
// exp(sum_{t<chunk} lg_t) (tokens past c carry log decay 0).
template <class V, class LgFn, class OutFn, class ExpFn>
TM_HOST_DEVICE V chunk_prefix_decays(int chunk, int c, LgFn lg, OutFn out, ExpFn exp) {
  V sum{};
  for (int i = 0; i < chunk; ++i) {
    sum += lg(i);
    out(i, i < c ? exp(sum) : V{});
  }
  return exp(sum);
}

// out(j, exp(sum_{j<t<chunk} lg_t)) for j < chunk.
template <class V, class LgFn, class OutFn, class ExpFn>
TM_HOST_DEVICE void chunk_suffix_decays(int chunk, int c, LgFn lg, OutFn out, ExpFn exp) {
  V sum{};
  for (int j = chunk - 1; j >= 0; --j) {
    out(j, j < c ? exp(sum) : V{});
    sum += lg(j);
  }
}

}  // namespace tokenmix
