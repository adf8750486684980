// Kernel entry points of each instruction set and the run-time choice.
#pragma once

#include "tokenmix/attention_problem.h"
#include "tokenmix/block_sparse_problem.h"
#include "tokenmix/fft_problem.h"
#include "tokenmix/linear_scan_problem.h"

namespace tokenmix::cpu {

#define TOKENMIX_DECLARE_ISA_KERNELS(isa)                              \
  namespace isa {                                                      \
  void neighborhood_forward_cpu(const NeighborhoodProblem& p);         \
  void neighborhood_backward_cpu(const NeighborhoodProblem& p);        \
  void block_sparse_forward_cpu(const BlockSparseProblem& p);          \
  void block_sparse_backward_cpu(const BlockSparseProblem& p);         \
  void linear_scan_cpu(const LinearScanProblem& p, bool backward);     \
  void delta_rule_cpu(const LinearScanProblem& p, bool backward);      \
  void fft_conv_cpu(const FftConvProblem& p, bool backward);           \
  void fourier_mix_cpu(const FourierMixProblem& p);                    \
  void global_filter_cpu(const GlobalFilterProblem& p, bool backward); \
  void spectral_gate_cpu(const SpectralGateProblem& p, bool backward); \
  }
TOKENMIX_DECLARE_ISA_KERNELS(generic)
TOKENMIX_DECLARE_ISA_KERNELS(avx2)
TOKENMIX_DECLARE_ISA_KERNELS(avx512)
#undef TOKENMIX_DECLARE_ISA_KERNELS

// "avx512", "avx2" or "generic": the best instruction set this CPU supports,
// unless TOKENMIX_CPU_ISA in the environment asks for a lower one.
const char* selected_isa();

void neighborhood_forward(const NeighborhoodProblem& p);
void neighborhood_backward(const NeighborhoodProblem& p);
void linear_scan(const LinearScanProblem& p, bool backward);
void delta_rule(const LinearScanProblem& p, bool backward);
void block_sparse_forward(const BlockSparseProblem& p);
void block_sparse_backward(const BlockSparseProblem& p);
void fft_conv(const FftConvProblem& p, bool backward);
void fourier_mix(const FourierMixProblem& p);
void global_filter(const GlobalFilterProblem& p, bool backward);
void spectral_gate(const SpectralGateProblem& p, bool backward);

}  // namespace tokenmix::cpu
