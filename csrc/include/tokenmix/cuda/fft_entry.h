// Entry points of the CUDA FFT-mixing kernels, seen by the op layers. Built twice like the
// attention engine's (bs_entry.h): by nvcc into namespace gpu (tokenmix/_C.so) and by the host
// compiler into namespace emulated (the test library).
#pragma once

#include <string>

#include "tokenmix/fft_problem.h"

namespace tokenmix::cuda {

// Why the CUDA fft_conv kernels cannot run this problem ("" when they can): float32, float16
// or bfloat16, and a power-of-two transform of at most kFftConvCudaMaxSize points (linear
// convolutions pad to one; circular ones need L itself to be one).
inline std::string fft_conv_unsupported_reason(const FftConvProblem& p) {
  if (p.dtype == DType::kFloat64)
    return "tokenmix: fft_conv on CUDA takes float32, float16 or bfloat16";
  if (p.k.dtype == DType::kFloat64 || (p.bias.data && p.bias.dtype == DType::kFloat64))
    return "tokenmix: fft_conv on CUDA takes float32, float16 or bfloat16 filters and biases";
  if (fft_conv_cuda_size(p.length, p.filter_length, p.causal) == 0)
    return "tokenmix: fft_conv on CUDA needs a transform of at most " +
           std::to_string(kFftConvCudaMaxSize) +
           " points (L + Lk - 1 for causal, L a power of two for circular convolution)";
  return "";
}

#define TOKENMIX_FFT_ENTRY_POINTS                               \
  void fft_conv_forward(const FftConvProblem& p, void* stream); \
  void fft_conv_backward(const FftConvProblem& p, void* stream);

namespace gpu {
TOKENMIX_FFT_ENTRY_POINTS
}
namespace emulated {
TOKENMIX_FFT_ENTRY_POINTS
}
#undef TOKENMIX_FFT_ENTRY_POINTS

}  // namespace tokenmix::cuda
