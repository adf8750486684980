// Outputs and workspaces of the emulated ops start as NaN, so that an element a kernel never
// writes cannot pass a comparison by chance.
#pragma once

#include <cmath>
#include <cstdint>

#include "tokenmix/tensor_view.h"

namespace tokenmix::emulated_op {

inline void fill_nan(void* data, DType dtype, int64_t count) {
  if (!data) return;
  for (int64_t i = 0; i < count; ++i) {
    switch (dtype) {
      case DType::kFloat32: static_cast<float*>(data)[i] = NAN; break;
      case DType::kFloat64: static_cast<double*>(data)[i] = NAN; break;
      default: static_cast<uint16_t*>(data)[i] = 0x7fff; break;  // NaN in fp16 and bf16
    }
  }
}

}  // namespace tokenmix::emulated_op
