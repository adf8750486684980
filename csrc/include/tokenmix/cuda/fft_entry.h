// Entry points of the CUDA FFT-mixing kernels, seen by the op layers. Built twice like the
// attention engine's (bs_entry.h): by nvcc into namespace gpu (tokenmix/_C.so) and by the host
// compiler into namespace emulated (the test library).
#pragma once

#include <initializer_list>
#include <string>

#include "tokenmix/fft_problem.h"

namespace tokenmix::cuda {

// Why the CUDA fft_conv kernels cannot run this problem ("" when they can): float32, float16
// or bfloat16, and a power-of-two transform of at most kFftConvCudaMaxSize points
// (fft_conv_cuda_size).
inline std::string fft_conv_unsupported_reason(const FftConvProblem& p) {
  if (p.dtype == DType::kFloat64)
    return "tokenmix: fft_conv on CUDA takes float32, float16 or bfloat16";
  if (p.k.dtype == DType::kFloat64 || (p.bias.data && p.bias.dtype == DType::kFloat64))
    return "tokenmix: fft_conv on CUDA takes float32, float16 or bfloat16 filters and biases";
  if (fft_conv_cuda_size(p.length, p.filter_length, p.causal) == 0)
    return "tokenmix: fft_conv on CUDA needs a transform of at most " +
           std::to_string(kFftConvCudaMaxSize) +
           " points (L + Lk - 1 rounded up to a power of two, or L itself for a circular "
           "convolution of a power-of-two L)";
  return "";
}

// Why the CUDA kernels of fourier_mix / global_filter / spectral_gate cannot run a problem whose
// transformed axes have these lengths ("" when they can): float32, float16 or bfloat16, and
// every length within fft_line_cuda_size.
inline std::string fft_mix_unsupported_reason(DType dtype, std::initializer_list<int64_t> lengths,
                                              const char* op) {
  if (dtype == DType::kFloat64)
    return std::string("tokenmix: ") + op + " on CUDA takes float32, float16 or bfloat16";
  for (const int64_t n : lengths)
    if (n > 0 && fft_line_cuda_size(n) == 0)
      return std::string("tokenmix: ") + op + " on CUDA transforms lengths of at most " +
             std::to_string(kFftConvCudaBlockSize) + " (a power of two) or " +
             std::to_string(kFftConvCudaBlockSize / 2 - 1) + " (any other), got " +
             std::to_string(n);
  return "";
}

#define TOKENMIX_FFT_ENTRY_POINTS                                                \
  void fft_conv_forward(const FftConvProblem& p, void* stream);                  \
  void fft_conv_backward(const FftConvProblem& p, void* stream);                 \
  void fourier_mix(const FourierMixProblem& p, void* stream);                    \
  void global_filter(const GlobalFilterProblem& p, bool backward, void* stream); \
  void spectral_gate(const SpectralGateProblem& p, bool backward, void* stream);

namespace gpu {
TOKENMIX_FFT_ENTRY_POINTS
}
namespace emulated {
TOKENMIX_FFT_ENTRY_POINTS
}
#undef TOKENMIX_FFT_ENTRY_POINTS

}  // namespace tokenmix::cuda
