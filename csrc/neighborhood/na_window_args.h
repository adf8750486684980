// Checks of the integer window arguments of the neighborhood-attention ops (na_forward,
// na_backward, na_plan and their emulated twins), shared so that every op accepts exactly the
// same values and names the offending argument. Every check is free of overflow: the values come
// straight from a caller (any int64), and are only narrowed to the int fields of WindowDim once
// they are known to be small. Torch stable ABI only.
#pragma once

#include <torch/headeronly/util/Exception.h>

#include <cstdint>

#include "tokenmix/window.h"

namespace tokenmix::na_op {

using WindowList = torch::headeronly::HeaderOnlyArrayRef<int64_t>;

// Longest spatial extent the window math takes: the headers compute in int, with sums such as
// `leader + right` and `first + tile - 1` of two extents (see window.h, neighborhood_schedule.h).
constexpr int64_t kMaxSpatialLength = int64_t(1) << 30;

// Checks kernel_size / stride / dilation / is_causal against the spatial extents `lengths`
// (`rank` of them; `what` names them in errors, e.g. "q spatial size") and fills dims, padded to
// three dimensions with leading length-1 windows.
inline void check_window_args(const int64_t* lengths, int rank, WindowList kernel,
                              WindowList stride, WindowList dilation, WindowList causal,
                              const char* what, WindowDim dims[3]) {
  STD_TORCH_CHECK(kernel.size() >= 1 && kernel.size() <= 3,
                  "tokenmix: kernel_size must have 1 to 3 entries (one per spatial dimension), "
                  "got ",
                  kernel.size());
  STD_TORCH_CHECK(int64_t(kernel.size()) == rank && stride.size() == kernel.size() &&
                      dilation.size() == kernel.size() && causal.size() == kernel.size(),
                  "tokenmix: kernel_size, stride, dilation and is_causal must have one entry per "
                  "spatial dimension (",
                  rank, "), got lengths ", kernel.size(), ", ", stride.size(), ", ",
                  dilation.size(), " and ", causal.size());
  for (int t = 0; t < 3; ++t) dims[t] = WindowDim{1, 1, 1, 1, false};
  for (int i = 0; i < rank; ++i) {
    const int64_t len = lengths[i];
    STD_TORCH_CHECK(len >= 1 && len <= kMaxSpatialLength, "tokenmix: ", what, " ", len,
                    " (spatial dimension ", i, ") is out of range: it must be between 1 and 2^30");
    STD_TORCH_CHECK(kernel[i] >= 1 && kernel[i] <= len, "tokenmix: kernel_size[", i,
                    "] = ", kernel[i], " is out of range: it must be between 1 and the input size ",
                    len);
    STD_TORCH_CHECK(stride[i] >= 1 && stride[i] <= kernel[i], "tokenmix: stride[", i,
                    "] = ", stride[i], " is out of range: it must be between 1 and kernel_size[", i,
                    "] = ", kernel[i]);
    // kernel * dilation <= len, without forming the product (it can overflow int64).
    STD_TORCH_CHECK(dilation[i] >= 1 && kernel[i] <= len / dilation[i], "tokenmix: dilation[", i,
                    "] = ", dilation[i],
                    " is out of range: it must be >= 1 with kernel_size * dilation <= the input "
                    "size ",
                    len, " (kernel_size[", i, "] = ", kernel[i], ")");
    STD_TORCH_CHECK(causal[i] == 0 || causal[i] == 1, "tokenmix: is_causal[", i, "] = ", causal[i],
                    " must be 0 or 1");
    dims[3 - rank + i] =
        WindowDim{int(len), int(kernel[i]), int(stride[i]), int(dilation[i]), causal[i] != 0};
  }
}

}  // namespace tokenmix::na_op
