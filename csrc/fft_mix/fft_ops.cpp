// torch.ops.tokenmix.fft_conv_* / fourier_mix / global_filter_* / spectral_gate_*: the op
// schemas and the CPU implementations, registered through PyTorch's stable C ABI (the CUDA ones
// are in fft_cuda_ops.cpp). Checks and problem descriptors: fft_op_common.h.
#include "fft_op_common.h"
#include "fft_schemas.h"
#include "tokenmix/cpu/isa_dispatch.h"

namespace {

using namespace tokenmix::fft_op;

// Every input of a CPU op is a CPU tensor (the op's dispatch key is the first tensor's).
void require_cpu(std::initializer_list<std::optional<Tensor>> tensors) {
  for (const auto& t : tensors)
    STD_TORCH_CHECK(!t.has_value() || t->is_cpu(),
                    "tokenmix: CPU kernel called with non-CPU tensors");
}

void run_conv_cpu(const tokenmix::FftConvProblem& p, bool backward) {
  tokenmix::cpu::fft_conv(p, backward);
}

Tensor fft_conv_forward_cpu(Tensor u, Tensor k, std::optional<Tensor> bias,
                            std::optional<Tensor> pre_gate, std::optional<Tensor> post_gate,
                            bool causal) {
  require_cpu({u, k, bias, pre_gate, post_gate});
  return conv_forward(u, k, bias, pre_gate, post_gate, causal, run_conv_cpu);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fft_conv_backward_cpu(
    Tensor grad_out, Tensor u, Tensor k, std::optional<Tensor> bias, std::optional<Tensor> pre_gate,
    std::optional<Tensor> post_gate, bool causal) {
  require_cpu({grad_out, u, k, bias, pre_gate, post_gate});
  return conv_backward(grad_out, u, k, bias, pre_gate, post_gate, causal, run_conv_cpu);
}

// ---- fourier_mix, global_filter, spectral_gate --------------------------------------------

void run_mix_cpu(tokenmix::FourierMixProblem& p) {
  tokenmix::cpu::fourier_mix(p);
}
void run_filter_cpu(tokenmix::GlobalFilterProblem& p, bool backward) {
  tokenmix::cpu::global_filter(p, backward);
}
void run_gate_cpu(tokenmix::SpectralGateProblem& p, bool backward) {
  tokenmix::cpu::spectral_gate(p, backward);
}

Tensor fourier_mix_cpu(Tensor x) {
  require_cpu({x});
  return mix_forward(x, run_mix_cpu);
}

Tensor global_filter_forward_cpu(Tensor x, Tensor weight) {
  require_cpu({x, weight});
  return filter_forward(x, weight, run_filter_cpu);
}

std::tuple<Tensor, Tensor> global_filter_backward_cpu(Tensor grad_out, Tensor x, Tensor weight) {
  require_cpu({grad_out, x, weight});
  return filter_backward(grad_out, x, weight, run_filter_cpu);
}

Tensor spectral_gate_forward_cpu(Tensor x, Tensor gate, std::optional<Tensor> bias, int64_t heads,
                                 bool modrelu) {
  require_cpu({x, gate, bias});
  return gate_forward(x, gate, bias, heads, modrelu, run_gate_cpu);
}

std::tuple<Tensor, Tensor, Tensor> spectral_gate_backward_cpu(Tensor grad_out, Tensor x,
                                                              Tensor gate,
                                                              std::optional<Tensor> bias,
                                                              int64_t heads, bool modrelu) {
  require_cpu({grad_out, x, gate, bias});
  return gate_backward(grad_out, x, gate, bias, heads, modrelu, run_gate_cpu);
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  using namespace tokenmix::fft_op;
  m.def(kFftConvForwardSchema);
  m.def(kFftConvBackwardSchema);
  m.def(kFourierMixSchema);
  m.def(kGlobalFilterForwardSchema);
  m.def(kGlobalFilterBackwardSchema);
  m.def(kSpectralGateForwardSchema);
  m.def(kSpectralGateBackwardSchema);
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("fft_conv_forward", TORCH_BOX(&fft_conv_forward_cpu));
  m.impl("fft_conv_backward", TORCH_BOX(&fft_conv_backward_cpu));
  m.impl("fourier_mix", TORCH_BOX(&fourier_mix_cpu));
  m.impl("global_filter_forward", TORCH_BOX(&global_filter_forward_cpu));
  m.impl("global_filter_backward", TORCH_BOX(&global_filter_backward_cpu));
  m.impl("spectral_gate_forward", TORCH_BOX(&spectral_gate_forward_cpu));
  m.impl("spectral_gate_backward", TORCH_BOX(&spectral_gate_backward_cpu));
}
