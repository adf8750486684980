// fft_conv's CUDA entry points: the dtype switch over the kernels of tokenmix/cuda/fft_conv.h.
// nvcc builds this file into namespace gpu; the host compiler (csrc/emulated/fft_emulated.cpp)
// into namespace emulated.
#include "tokenmix/cuda/fft_launch.h"

#if defined(__CUDACC__)
#define TOKENMIX_FFT_BACKEND gpu
#else
#define TOKENMIX_FFT_BACKEND emulated
#endif

namespace tokenmix::cuda::TOKENMIX_FFT_BACKEND {

void fft_conv_forward(const FftConvProblem& p, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return fft_host::conv_forward<F32>(p, stream);
    case DType::kFloat16: return fft_host::conv_forward<F16>(p, stream);
    case DType::kBFloat16: return fft_host::conv_forward<BF16>(p, stream);
    default: throw std::runtime_error(fft_conv_unsupported_reason(p));
  }
}

void fft_conv_backward(const FftConvProblem& p, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return fft_host::conv_backward<F32>(p, stream);
    case DType::kFloat16: return fft_host::conv_backward<F16>(p, stream);
    case DType::kBFloat16: return fft_host::conv_backward<BF16>(p, stream);
    default: throw std::runtime_error(fft_conv_unsupported_reason(p));
  }
}

}  // namespace tokenmix::cuda::TOKENMIX_FFT_BACKEND

#undef TOKENMIX_FFT_BACKEND
