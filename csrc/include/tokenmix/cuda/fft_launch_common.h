// Host helpers shared by the launchers of the FFT-mixing kernels (fft_launch.h for fft_conv,
// fft_mix_launch.h for the others): buffer extents for the emulator's registrations, checked
// launches and grid sizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tokenmix/cuda/fft_transform.h"
#include "tokenmix/cuda/launch_common.h"
#include "tokenmix/fft_problem.h"

namespace tokenmix::cuda::fft_host {

// Bytes from a strided tensor's first element to one past its last.
inline size_t extent_bytes(const FftTensor& t, const int64_t* shape, int dims) {
  if (!t.data) return 0;
  int64_t last = 0;
  for (int i = 0; i < dims; ++i) {
    if (shape[i] == 0) return 0;
    last += (shape[i] - 1) * t.stride[i];
  }
  return size_t(last + 1) * size_t(dtype_size(t.dtype));
}

inline void copy_strides(const FftTensor& t, int64_t* out, int dims) {
  for (int i = 0; i < dims; ++i) out[i] = t.stride[i];
}

// Launches kernel (after opting in to its shared memory) and reports a failed launch.
template <class K, class Params>
void launch_checked(K kernel, const char* name, dim3u grid, int64_t smem, const Params& prm,
                    void* stream) {
  if (smem > 0) prepare_shared(kernel, smem, checked_device(), name);
  launch_on(static_cast<stream_t>(stream), named(kernel, name), grid, dim3u(kFftConvThreads),
            size_t(smem), prm);
  check_launch(name);
}

// Blocks for a grid-stride kernel over `count` elements.
inline dim3u pointwise_grid(int64_t count) {
  const int64_t blocks = (count + kFftConvThreads - 1) / kFftConvThreads;
  return dim3u(uint32_t(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096), 1, 1);
}

}  // namespace tokenmix::cuda::fft_host
