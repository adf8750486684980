// Vector checks for inf and NaN, used by the engines' exact passes.
#pragma once

#include <cstdint>

#include "tokenmix/cpu/simd.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

// Whether every element of x[0, n) is finite (n a multiple of the vector
// width): x * 0 is 0 for a finite x and NaN otherwise.
template <class T>
inline bool all_finite(const T* x, int64_t n) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::kWidth;
  V acc{};
  for (int64_t i = 0; i < n; i += W) acc += vload<V>(x + i) * T(0);
  for (int i = 0; i < W; ++i)
    if (acc[i] != T(0)) return false;
  return true;
}

// bad[i] = whether row i (n rows of `width` elements, a multiple of the vector
// width) holds an inf or NaN; returns whether any does.
template <class T, class Rows>
inline bool flag_rows(const Rows& rows, int n, int width, uint8_t* bad) {
  bool any = false;
  for (int i = 0; i < n; ++i) {
    bad[i] = all_finite<T>(rows.row(i), width) ? 0 : 1;
    any |= bad[i] != 0;
  }
  return any;
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
