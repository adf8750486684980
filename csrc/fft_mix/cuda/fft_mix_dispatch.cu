// The CUDA entry points of fourier_mix, global_filter and spectral_gate: the dtype switch over the
// kernels of tokenmix/cuda/fft_mix_kernels.h. nvcc builds this file into namespace gpu; the host
// compiler (csrc/emulated/fft_mix_emulated.cpp) into namespace emulated.
#include "tokenmix/cuda/fft_mix_launch.h"

#if defined(__CUDACC__)
#define TOKENMIX_FFT_BACKEND gpu
#else
#define TOKENMIX_FFT_BACKEND emulated
#endif

namespace tokenmix::cuda::TOKENMIX_FFT_BACKEND {

// Runs run.template operator()<E>() for the problem's input dtype.
template <class Run>
void by_dtype(DType dtype, const Run& run) {
  switch (dtype) {
    case DType::kFloat32: return run(F32{});
    case DType::kFloat16: return run(F16{});
    case DType::kBFloat16: return run(BF16{});
    default:
      throw std::runtime_error("tokenmix: FFT mixing on CUDA takes float32, float16 or bfloat16");
  }
}

void fourier_mix(const FourierMixProblem& p, void* stream) {
  by_dtype(p.dtype, [&](auto e) { fft_host::fourier_mix<decltype(e)>(p, stream); });
}

void global_filter(const GlobalFilterProblem& p, bool backward, void* stream) {
  by_dtype(p.dtype, [&](auto e) { fft_host::global_filter<decltype(e)>(p, backward, stream); });
}

void spectral_gate(const SpectralGateProblem& p, bool backward, void* stream) {
  by_dtype(p.dtype, [&](auto e) { fft_host::spectral_gate<decltype(e)>(p, backward, stream); });
}

}  // namespace tokenmix::cuda::TOKENMIX_FFT_BACKEND

#undef TOKENMIX_FFT_BACKEND
