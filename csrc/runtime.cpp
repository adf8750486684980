// Run-time selection of the CPU instruction set.
#include <cstdlib>
#include <cstring>

#include "tokenmix/cpu/isa_dispatch.h"

namespace tokenmix::cpu {

namespace {
enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa detect() {
  __builtin_cpu_init();
  Isa best = Isa::kGeneric;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
  if (const char* req = std::getenv("TOKENMIX_CPU_ISA")) {
    if (std::strcmp(req, "generic") == 0) return Isa::kGeneric;
    if (std::strcmp(req, "avx2") == 0 && best != Isa::kGeneric) return Isa::kAvx2;
  }
  return best;
}

Isa isa() {
  static const Isa value = detect();
  return value;
}
}  // namespace

const char* selected_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

void neighborhood_forward(const NeighborhoodProblem& p) {
  switch (isa()) {
    case Isa::kAvx512: return avx512::neighborhood_forward_cpu(p);
    case Isa::kAvx2: return avx2::neighborhood_forward_cpu(p);
    default: return generic::neighborhood_forward_cpu(p);
  }
}

void neighborhood_backward(const NeighborhoodProblem& p) {
  switch (isa()) {
    case Isa::kAvx512: return avx512::neighborhood_backward_cpu(p);
    case Isa::kAvx2: return avx2::neighborhood_backward_cpu(p);
    default: return generic::neighborhood_backward_cpu(p);
  }
}

void block_sparse_forward(const BlockSparseProblem& p) {
  switch (isa()) {
    case Isa::kAvx512: return avx512::block_sparse_forward_cpu(p);
    case Isa::kAvx2: return avx2::block_sparse_forward_cpu(p);
    default: return generic::block_sparse_forward_cpu(p);
  }
}

void block_sparse_backward(const BlockSparseProblem& p) {
  switch (isa()) {
    case Isa::kAvx512: return avx512::block_sparse_backward_cpu(p);
    case Isa::kAvx2: return avx2::block_sparse_backward_cpu(p);
    default: return generic::block_sparse_backward_cpu(p);
  }
}

void linear_scan(const LinearScanProblem& p, bool backward) {
  switch (isa()) {
    case Isa::kAvx512: return avx512::linear_scan_cpu(p, backward);
    case Isa::kAvx2: return avx2::linear_scan_cpu(p, backward);
    default: return generic::linear_scan_cpu(p, backward);
  }
}

void delta_rule(const LinearScanProblem& p, bool backward) {
  switch (isa()) {
    case Isa::kAvx512: return avx512::delta_rule_cpu(p, backward);
    case Isa::kAvx2: return avx2::delta_rule_cpu(p, backward);
    default: return generic::delta_rule_cpu(p, backward);
  }
}

void fft_conv(const FftConvProblem& p, bool backward) {
  switch (isa()) {
    case Isa::kAvx512: return avx512::fft_conv_cpu(p, backward);
    case Isa::kAvx2: return avx2::fft_conv_cpu(p, backward);
    default: return generic::fft_conv_cpu(p, backward);
  }
}

void fourier_mix(const FourierMixProblem& p) {
  switch (isa()) {
    case Isa::kAvx512: return avx512::fourier_mix_cpu(p);
    case Isa::kAvx2: return avx2::fourier_mix_cpu(p);
    default: return generic::fourier_mix_cpu(p);
  }
}

void global_filter(const GlobalFilterProblem& p, bool backward) {
  switch (isa()) {
    case Isa::kAvx512: return avx512::global_filter_cpu(p, backward);
    case Isa::kAvx2: return avx2::global_filter_cpu(p, backward);
    default: return generic::global_filter_cpu(p, backward);
  }
}

void spectral_gate(const SpectralGateProblem& p, bool backward) {
  switch (isa()) {
    case Isa::kAvx512: return avx512::spectral_gate_cpu(p, backward);
    case Isa::kAvx2: return avx2::spectral_gate_cpu(p, backward);
    default: return generic::spectral_gate_cpu(p, backward);
  }
}

}  // namespace tokenmix::cpu
