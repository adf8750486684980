// Helpers shared by every CPU engine: rounding and the host thread pool.
#pragma once

#include <cstdint>

#include "tokenmix/cpu/simd.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

inline int round_up(int x, int m) {
  return (x + m - 1) / m * m;
}

// Runs f(begin, end) over [0, n) on the problem's thread pool (any problem
// descriptor with a ParallelForFn parallel_for member).
template <class Problem, class F>
void run_parallel(const Problem& p, int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  auto tramp = [](int64_t b, int64_t e, void* c) { (*static_cast<const F*>(c))(b, e); };
  p.parallel_for(0, n, grain, tramp, const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
