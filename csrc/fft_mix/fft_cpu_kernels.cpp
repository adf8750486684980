// CPU kernels of the FFT-mixing family, instantiated for every input dtype (half precision
// computes in float32). CMake compiles this file once per instruction set.
#include "tokenmix/cpu/fft_conv_kernels.h"
#include "tokenmix/cpu/fft_grid_kernels.h"
#include "tokenmix/cpu/isa_dispatch.h"
#include "tokenmix/cpu/spectral_gate_kernels.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

// Runs CALL with S = the storage type of dtype and T = its compute type.
#define TOKENMIX_FFT_DTYPE_SWITCH(dtype, CALL) \
  switch (dtype) {                             \
    case DType::kFloat32: {                    \
      using S = float;                         \
      using T = float;                         \
      CALL;                                    \
      return;                                  \
    }                                          \
    case DType::kFloat64: {                    \
      using S = double;                        \
      using T = double;                        \
      CALL;                                    \
      return;                                  \
    }                                          \
    case DType::kFloat16: {                    \
      using S = Half;                          \
      using T = float;                         \
      CALL;                                    \
      return;                                  \
    }                                          \
    case DType::kBFloat16: {                   \
      using S = BFloat16;                      \
      using T = float;                         \
      CALL;                                    \
      return;                                  \
    }                                          \
  }

void fft_conv_cpu(const FftConvProblem& p, bool backward) {
  TOKENMIX_FFT_DTYPE_SWITCH(p.dtype, (fft_conv_cpu_impl<S, T>(p, backward)))
}

void fourier_mix_cpu(const FourierMixProblem& p) {
  TOKENMIX_FFT_DTYPE_SWITCH(p.dtype, (fourier_mix_cpu_impl<S, T>(p)))
}

void global_filter_cpu(const GlobalFilterProblem& p, bool backward) {
  TOKENMIX_FFT_DTYPE_SWITCH(p.dtype, (global_filter_cpu_impl<S, T>(p, backward)))
}

void spectral_gate_cpu(const SpectralGateProblem& p, bool backward) {
  TOKENMIX_FFT_DTYPE_SWITCH(p.dtype, (spectral_gate_cpu_impl<S, T>(p, backward)))
}

#undef TOKENMIX_FFT_DTYPE_SWITCH

}  // namespace tokenmix::cpu::TOKENMIX_ISA
